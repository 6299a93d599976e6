//! Criterion benchmarks of one plugin hook call through `sandpiper::plugins::Plugins`, with
//! real components: the no-op `transform` and `deliver` hooks of `tests/plugins` (built with
//! the Rust SDK) and the bundled `acl` plugin (`plugins/build`) for `authorize`, cached and
//! not.
//!
//! What a call costs: taking a pooled instance, setting its deadline, lowering the
//! arguments into its memory, running the guest, lifting the answer. Transform is measured
//! with one message and with 64 (what one read of a busy publisher hands it).
//!
//! `cargo bench -p sandpiper --bench plugins` (builds the plugins first, for wasm32-wasip2)

use std::collections::VecDeque;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sandpiper::codec::{MessageProperties, QoS, TopicName};
use sandpiper::message::Draft;
use sandpiper::message::{Delivery, Message};
use sandpiper::plugins::flow::Fate;
use sandpiper::plugins::gate::Gate;
use sandpiper::plugins::{Action, ClientInfo, Plugins, Request};

const ACL: &str = r#"
[config]
[[config.rules]]
allow = "readwrite"
topic = "bench/#"
"#;

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    panic!("{what}: {e}")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the bundled plugins and the test plugins; returns the folder of the latter.
fn build() -> PathBuf {
    let root = root();
    let ok = std::process::Command::new(root.join("plugins/build"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "plugins/build failed");
    let target = root.join("plugins/target");
    let ok = std::process::Command::new("cargo")
        .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
        .arg("--manifest-path")
        .arg(root.join("tests/plugins/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "building tests/plugins failed");
    target.join("wasm32-wasip2/release")
}

/// A host whose plugins folder holds `files` (name, source component, sidecar), loaded.
fn host(files: &[(&str, PathBuf, &str)]) -> Arc<Plugins> {
    let dir = std::env::temp_dir().join(format!(
        "sandpiper-bench-plugins-{}-{}",
        std::process::id(),
        files.first().map_or("none", |f| f.0)
    ));
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap_or_else(|e| fail("plugins dir", e));
    for (name, wasm, sidecar) in files {
        std::fs::copy(wasm, plugins.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| fail("copy plugin", e));
        std::fs::write(plugins.join(format!("{name}.toml")), sidecar)
            .unwrap_or_else(|e| fail("sidecar", e));
    }
    let p = Arc::new(Plugins::new(
        Some(plugins),
        dir.join("cache"),
        None,
        1 << 20,
    ));
    p.start(tokio_util::sync::CancellationToken::new());
    assert_eq!(p.chain().plugins.len(), files.len(), "plugins not loaded");
    p
}

fn client() -> ClientInfo {
    ClientInfo {
        client_id: "bench-client".into(),
        principal: Arc::new(sandpiper::message::Principal {
            user: Some("bench".into()),
            listener: "default".into(),
        }),
        attributes: Box::default(),
    }
}

fn topic() -> TopicName {
    TopicName::new("bench/plant-7/line-3/temperature").unwrap_or_else(|e| fail("topic", e))
}

fn drafts(n: usize) -> Vec<Draft> {
    (0..n)
        .map(|_| Draft {
            topic: topic(),
            payload: Bytes::from(vec![0x5A; 64]),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: MessageProperties::default(),
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let built = build();
    let client = client();

    let t = host(&[("noop", built.join("noop_transform.wasm"), "")]);
    let mut g = c.benchmark_group("transform");
    for n in [1, 64] {
        let mut d = drafts(n);
        let mut fates = vec![Fate::Route; n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("noop_{n}"), |b| {
            b.iter(|| {
                t.transform(&client, &mut d, &mut fates, None);
                black_box(&fates);
            })
        });
    }
    g.finish();

    let d = host(&[("noop", built.join("noop_deliver.wasm"), "")]);
    let msg = Arc::new(Message {
        topic: topic(),
        payload: Bytes::from(vec![0x5A; 64]),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: MessageProperties::default(),
        expires_at: None,
        publisher: Some(1),
    });
    let delivery = Delivery {
        msg,
        qos: QoS::AtMostOnce,
        retain: false,
        sub_ids: Vec::new(),
        shared: None,
        store_id: None,
        hooked: false,
    };
    c.bench_function("deliver/noop_1", |b| {
        let mut batch = VecDeque::with_capacity(1);
        b.iter(|| {
            batch.push_back(delivery.clone());
            black_box(d.deliver(&client, &mut batch));
            batch.clear();
        })
    });

    let a = host(&[("acl", root().join("plugins/dist/acl.wasm"), ACL)]);
    let topic = topic();
    let req = [Request {
        action: Action::Publish,
        topic: topic.as_str(),
        qos: QoS::AtMostOnce,
        retain: false,
    }];
    c.bench_function("authorize/acl_uncached", |b| {
        b.iter(|| black_box(a.authorize(&client, &req)))
    });
    let mut gate = Gate::new(a.clone(), client.clone());
    c.bench_function("authorize/acl_cached", |b| {
        b.iter(|| black_box(gate.check(Action::Publish, topic.as_str(), QoS::AtMostOnce, false)))
    });
}

criterion_group!(plugins, benches);
criterion_main!(plugins);
