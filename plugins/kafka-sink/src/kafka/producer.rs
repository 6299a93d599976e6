//! The producer: keeps connections and cluster metadata between calls, and delivers a
//! batch of records with acks=all or says why it could not.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{MetadataRequest, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::conn::Conn;
use super::records::{self, Record};
use super::{Error, Outgoing, Settings, partition};

/// acks = all: the leader answers once every in-sync replica has the records.
const ACKS_ALL: i16 = -1;

/// Kafka error codes that retrying the same records cannot fix: MESSAGE_TOO_LARGE (10),
/// INVALID_TOPIC_EXCEPTION (17), RECORD_LIST_TOO_LARGE (18), INVALID_TIMESTAMP (32),
/// INVALID_RECORD (87).
const UNFIXABLE: [i16; 5] = [10, 17, 18, 32, 87];

/// What to do with records the server refuses for a reason retrying cannot fix (too
/// large, invalid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rejected {
    /// Keep retrying (nothing is lost, but the sink stalls until the server's limits or
    /// the records change).
    #[default]
    Retry,
    /// Drop them and go on; the call's report lists them.
    Drop,
}

/// What a successful `produce` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records the server acknowledged.
    pub acknowledged: usize,
    /// Records dropped under [`Rejected::Drop`]: (topic, partition, count, why).
    pub dropped: Vec<(String, i32, usize, String)>,
}

/// A topic's partitions: the leader's broker id per partition index.
#[derive(Debug, Clone)]
struct TopicMeta {
    leaders: Vec<i32>,
}

/// The cluster as last described by a Metadata response.
#[derive(Debug, Default)]
struct Metadata {
    brokers: HashMap<i32, String>,
    topics: HashMap<String, TopicMeta>,
    /// Why topics asked for are not in `topics`.
    problems: Vec<String>,
    fetched: Option<Instant>,
}

/// A Kafka producer over blocking sockets. Not thread-safe by design: a sink instance
/// handles one call at a time.
pub struct Producer {
    settings: Settings,
    conns: HashMap<String, Conn>,
    meta: Metadata,
}

/// The records of each partition, in order.
type PartitionRecords<'a> = BTreeMap<(&'a str, i32), Vec<&'a Record>>;
/// A partition's records cut into runs that each fit one record batch.
type Chunks<'r, 'a> = Vec<&'r [&'a Record]>;

impl Producer {
    /// A producer that connects on first use.
    pub fn new(settings: Settings) -> Producer {
        Producer {
            settings,
            conns: HashMap::new(),
            meta: Metadata::default(),
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Produces `records`, in order per partition, and returns once the server has
    /// acknowledged all of them (acks=all) or, on error, drops the connections and
    /// metadata involved so that the next call starts afresh. Some records may have been
    /// written when this fails: retrying delivers them again (at least once).
    pub fn produce(&mut self, records: &[Outgoing]) -> Result<Report, Error> {
        let deadline = Instant::now() + self.settings.timeout;
        let result = self.produce_by(records, deadline);
        if let Err(e) = &result {
            self.forget_after(e);
        }
        result
    }

    fn forget_after(&mut self, e: &Error) {
        match e {
            Error::Connect { addr, .. }
            | Error::Io { addr, .. }
            | Error::Protocol { addr, .. }
            | Error::Unsupported { addr, .. } => {
                self.conns.remove(addr);
            }
            Error::Metadata(_) | Error::Kafka { .. } | Error::Encode(_) | Error::Deadline => {}
        }
        // Leaders may have moved or topics appeared: ask again next time.
        self.meta = Metadata::default();
    }

    fn produce_by(&mut self, records: &[Outgoing], deadline: Instant) -> Result<Report, Error> {
        if records.is_empty() {
            return Ok(Report::default());
        }
        let topics: BTreeSet<&str> = records.iter().map(|o| o.topic.as_str()).collect();
        let stale = self
            .meta
            .fetched
            .is_none_or(|t| t.elapsed() > self.settings.metadata_max_age);
        if stale || topics.iter().any(|t| !self.meta.topics.contains_key(*t)) {
            self.refresh_metadata(&topics, deadline)?;
        }

        // Leader -> partition -> records, keeping the batch's order within a partition.
        let mut by_leader: BTreeMap<i32, PartitionRecords<'_>> = BTreeMap::new();
        for o in records {
            let Some(topic) = self.meta.topics.get(&o.topic) else {
                return Err(Error::Metadata(format!(
                    "no metadata for topic {}",
                    o.topic
                )));
            };
            let index = partition::choose(o.record.key.as_deref(), topic.leaders.len());
            let (Some(&leader), Ok(p)) = (topic.leaders.get(index), i32::try_from(index)) else {
                return Err(Error::Metadata(format!(
                    "topic {} has no partitions",
                    o.topic
                )));
            };
            by_leader
                .entry(leader)
                .or_default()
                .entry((o.topic.as_str(), p))
                .or_default()
                .push(&o.record);
        }

        let mut report = Report::default();
        for (leader, partitions) in by_leader {
            let Some(addr) = self.meta.brokers.get(&leader).cloned() else {
                return Err(Error::Metadata(format!(
                    "leader {leader} is not among the brokers"
                )));
            };
            self.produce_to(&addr, partitions, deadline, &mut report)?;
        }
        Ok(report)
    }

    /// Sends the records of `partitions` to their leader at `addr`: one Produce request,
    /// or more when a partition has more than `max_batch_bytes` of records (a request
    /// carries one record batch per partition).
    fn produce_to(
        &mut self,
        addr: &str,
        partitions: PartitionRecords<'_>,
        deadline: Instant,
        report: &mut Report,
    ) -> Result<(), Error> {
        let max = self.settings.max_batch_bytes;
        let chunked: Vec<((&str, i32), Chunks<'_, '_>)> = partitions
            .iter()
            .map(|(&tp, recs)| (tp, chunks(recs, max)))
            .collect();
        let rounds = chunked.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        let on_rejected = self.settings.on_rejected;
        let conn = self.conn(addr, deadline)?;
        for round in 0..rounds {
            // Topic -> (partition, records) for this round.
            let mut sent: BTreeMap<&str, Vec<(i32, &[&Record])>> = BTreeMap::new();
            for ((topic, p), chunks) in &chunked {
                if let Some(recs) = chunks.get(round) {
                    sent.entry(topic).or_default().push((*p, recs));
                }
            }
            let mut topic_data = Vec::with_capacity(sent.len());
            for (topic, parts) in &sent {
                let mut partition_data = Vec::with_capacity(parts.len());
                for (p, recs) in parts {
                    let batch = records::encode_batch(recs)?;
                    partition_data.push(
                        PartitionProduceData::default()
                            .with_index(*p)
                            .with_records(Some(Bytes::from(batch))),
                    );
                }
                topic_data.push(
                    TopicProduceData::default()
                        .with_name(topic_name(topic))
                        .with_partition_data(partition_data),
                );
            }
            // The server waits at most this long for the replicas.
            let wait = deadline.saturating_duration_since(Instant::now());
            let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
            let request = ProduceRequest::default()
                .with_acks(ACKS_ALL)
                .with_timeout_ms(wait_ms)
                .with_topic_data(topic_data);
            let version = conn.produce_version;
            let response = conn.call(request, version, deadline, "Produce")?;

            // Every partition sent must be answered, without error.
            let mut answers: HashMap<(&str, i32), (i16, Option<String>)> = HashMap::new();
            for t in &response.responses {
                for pr in &t.partition_responses {
                    let message = pr.error_message.as_ref().map(|m| m.as_str().to_owned());
                    answers.insert((t.name.0.as_str(), pr.index), (pr.error_code, message));
                }
            }
            for (topic, parts) in &sent {
                for (p, recs) in parts {
                    let Some((code, message)) = answers.get(&(*topic, *p)) else {
                        return Err(Error::Protocol {
                            addr: addr.to_owned(),
                            why: format!("Produce response lacks {topic}/{p}"),
                        });
                    };
                    if *code == 0 {
                        report.acknowledged += recs.len();
                        continue;
                    }
                    let why = describe(*code, message.as_deref());
                    if on_rejected == Rejected::Drop && UNFIXABLE.contains(code) {
                        report
                            .dropped
                            .push(((*topic).to_owned(), *p, recs.len(), why));
                        continue;
                    }
                    return Err(Error::Kafka {
                        topic: (*topic).to_owned(),
                        partition: *p,
                        code: *code,
                        why,
                    });
                }
            }
        }
        Ok(())
    }

    /// The open connection to `addr`, connecting (and negotiating versions) if needed.
    fn conn(&mut self, addr: &str, deadline: Instant) -> Result<&mut Conn, Error> {
        if !self.conns.contains_key(addr) {
            let s = &self.settings;
            let conn = Conn::open(addr, &s.client_id, s.connect_timeout, deadline)?;
            self.conns.insert(addr.to_owned(), conn);
        }
        self.conns
            .get_mut(addr)
            .ok_or_else(|| Error::Metadata(format!("no connection to {addr}")))
    }

    /// Asks for the metadata of `topics` through an open connection or, failing that, the
    /// bootstrap addresses in order.
    fn refresh_metadata(
        &mut self,
        topics: &BTreeSet<&str>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let mut candidates: Vec<String> = self.conns.keys().cloned().collect();
        for b in &self.settings.bootstrap {
            if !candidates.contains(b) {
                candidates.push(b.clone());
            }
        }
        let mut last = Error::Metadata("no bootstrap address".into());
        for addr in candidates {
            match self.metadata_from(&addr, topics, deadline) {
                Ok(meta) => {
                    self.meta = meta;
                    return check_topics(&self.meta, topics);
                }
                Err(e) => {
                    self.conns.remove(&addr);
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn metadata_from(
        &mut self,
        addr: &str,
        topics: &BTreeSet<&str>,
        deadline: Instant,
    ) -> Result<Metadata, Error> {
        let auto_create = self.settings.auto_create_topics;
        let conn = self.conn(addr, deadline)?;
        let request = MetadataRequest::default().with_topics(Some(
            topics
                .iter()
                .map(|t| MetadataRequestTopic::default().with_name(Some(topic_name(t))))
                .collect(),
        ));
        let version = conn.metadata_version;
        // Before version 4 the server decides alone (the field must stay at its default).
        let request = request.with_allow_auto_topic_creation(auto_create || version < 4);
        let response = conn.call(request, version, deadline, "Metadata")?;

        let mut meta = Metadata {
            fetched: Some(Instant::now()),
            ..Metadata::default()
        };
        for b in &response.brokers {
            meta.brokers
                .insert(b.node_id.0, host_port(b.host.as_str(), b.port));
        }
        let problems = &mut meta.problems;
        for t in &response.topics {
            let Some(name) = t.name.as_ref().map(|n| n.0.as_str().to_owned()) else {
                continue;
            };
            if t.error_code != 0 {
                problems.push(format!("{name}: {}", describe(t.error_code, None)));
                continue;
            }
            let mut parts: Vec<(i32, i32, i16)> = t
                .partitions
                .iter()
                .map(|p| (p.partition_index, p.leader_id.0, p.error_code))
                .collect();
            parts.sort_unstable();
            let contiguous = parts
                .iter()
                .enumerate()
                .all(|(i, p)| usize::try_from(p.0).is_ok_and(|x| x == i));
            if parts.is_empty() || !contiguous {
                problems.push(format!("{name}: partitions are not 0..n"));
                continue;
            }
            // A partition without a leader cannot take records now.
            if let Some(p) = parts
                .iter()
                .find(|p| p.1 < 0 || !meta.brokers.contains_key(&p.1))
            {
                problems.push(format!(
                    "{name}/{}: no leader ({})",
                    p.0,
                    describe(p.2, None)
                ));
                continue;
            }
            let leaders = parts.iter().map(|p| p.1).collect();
            meta.topics.insert(name, TopicMeta { leaders });
        }
        Ok(meta)
    }
}

/// Every topic asked for has partitions with leaders, or says which does not.
fn check_topics(meta: &Metadata, topics: &BTreeSet<&str>) -> Result<(), Error> {
    let missing: Vec<&str> = topics
        .iter()
        .copied()
        .filter(|t| !meta.topics.contains_key(*t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let why = if meta.problems.is_empty() {
        "not in the server's answer".to_owned()
    } else {
        meta.problems.join("; ")
    };
    Err(Error::Metadata(format!(
        "topic(s) {} not available: {why} (create them, or let the server create topics)",
        missing.join(", ")
    )))
}

/// Splits one partition's records into runs of at most `max` bytes (a record larger than
/// `max` goes alone; the server decides whether it fits).
fn chunks<'r, 'a>(records: &'r [&'a Record], max: usize) -> Chunks<'r, 'a> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, r) in records.iter().enumerate() {
        let n = records::encoded_hint(r);
        if i > start && size + n > max {
            out.extend(records.get(start..i));
            start = i;
            size = 0;
        }
        size += n;
    }
    out.extend(records.get(start..));
    out.retain(|c| !c.is_empty());
    out
}

fn topic_name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_owned()))
}

/// `host:port`, with brackets around an IPv6 host.
fn host_port(host: &str, port: i32) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A Kafka error code as its name and description, with the server's message if any.
fn describe(code: i16, message: Option<&str>) -> String {
    let known = match ResponseError::try_from_code(code) {
        Some(ResponseError::Unknown(_)) | None => format!("error {code}"),
        Some(e) => format!("{e:?}: {e}"),
    };
    match message {
        Some(m) if !m.is_empty() => format!("{known} ({m})"),
        _ => known,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: usize) -> Record {
        Record {
            key: None,
            value: vec![0; n],
            headers: vec![],
            timestamp_ms: 0,
        }
    }

    #[test]
    fn chunks_keep_order_and_size() {
        let rs: Vec<Record> = [10, 10, 10, 100, 10].iter().map(|&n| rec(n)).collect();
        let refs: Vec<&Record> = rs.iter().collect();
        let c = chunks(&refs, 80);
        let lens: Vec<usize> = c.iter().map(|c| c.len()).collect();
        assert_eq!(lens, vec![2, 1, 1, 1]);
        let flat: Vec<usize> = c
            .iter()
            .flat_map(|c| c.iter().map(|r| r.value.len()))
            .collect();
        assert_eq!(flat, vec![10, 10, 10, 100, 10]);
        assert_eq!(chunks(&refs, usize::MAX).len(), 1);
        assert!(chunks(&[], 10).is_empty());
    }

    #[test]
    fn addresses_and_error_names() {
        assert_eq!(host_port("127.0.0.1", 9092), "127.0.0.1:9092");
        assert_eq!(host_port("::1", 9092), "[::1]:9092");
        assert_eq!(host_port("kafka-1", 9093), "kafka-1:9093");
        assert!(
            describe(6, None).starts_with("NotLeaderOrFollower"),
            "{}",
            describe(6, None)
        );
        assert!(describe(10, Some("too big")).ends_with("(too big)"));
        assert_eq!(describe(-42, None), "error -42");
    }
}
