//! The mailbox beside its code: lanes and order, limits, and the disk tail of a persistent
//! session.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

mod queue {
    use super::super::*;

    fn d(n: u8, qos: QoS) -> Delivery {
        Delivery::for_test(qos, &[n])
    }

    fn online(max_messages: usize) -> Mailbox {
        let m = Mailbox::new(QueueLimits {
            max_messages,
            max_bytes: 1 << 20,
            backpressure: true,
        });
        m.set_online(true);
        m
    }

    fn payloads(v: &VecDeque<Delivery>) -> Vec<u8> {
        v.iter().map(|d| d.msg.payload[0]).collect()
    }

    /// A connection parking takes a wake-up that came while nobody waited (a delivery, a
    /// question, a kick's wake), once.
    #[test]
    fn a_wake_up_nobody_waited_for_is_taken_once() {
        let m = online(8);
        assert!(m.take_wake(), "going online wakes");
        assert!(!m.take_wake());
        m.push(d(1, QoS::AtLeastOnce)).unwrap();
        assert!(m.take_wake(), "a delivery wakes");
        assert!(!m.take_wake());
        m.wake();
        m.wake();
        assert!(m.take_wake(), "wake-ups do not add up");
        assert!(!m.take_wake());
    }

    /// Large messages fill the bytes limit long before the count: publishers are held
    /// back at half of either, and let go once the queue is under half of both.
    #[test]
    fn half_the_bytes_limit_holds_publishers_back_too() {
        let m = Mailbox::new(QueueLimits {
            max_messages: 1000,
            max_bytes: 10_000,
            backpressure: true,
        });
        m.set_online(true);
        let big = |n: u8| Delivery::for_test(QoS::AtLeastOnce, &[n; 2000]);
        assert!(!m.push(big(1)).unwrap().congested);
        assert!(!m.push(big(2)).unwrap().congested);
        // 6,000 of 10,000 bytes (the topic counts too): half full, three messages of 1,000.
        assert!(m.push(big(3)).unwrap().congested);
        let mut out = VecDeque::new();
        assert!(m.drain(&mut out, 1, 10));
        assert!(m.push(big(4)).unwrap().congested);
        out.clear();
        assert!(m.drain(&mut out, 2, 10));
        assert!(!m.push(big(5)).unwrap().congested);
    }

    #[test]
    fn shared_limits_change_every_mailbox_at_once() {
        let limits = SharedLimits::new(QueueLimits {
            max_messages: 4,
            max_bytes: 1 << 20,
            backpressure: false,
        });
        let (a, b) = (Mailbox::new(limits.clone()), Mailbox::new(limits.clone()));
        for m in [&a, &b] {
            m.set_online(true);
            m.push(d(1, QoS::AtLeastOnce)).unwrap();
            m.push(d(2, QoS::AtLeastOnce)).unwrap();
        }
        limits.set(QueueLimits {
            max_messages: 2,
            max_bytes: 1 << 20,
            backpressure: false,
        });
        for m in [&a, &b] {
            assert_eq!(m.push(d(3, QoS::AtLeastOnce)), Err(Refused::Full));
            assert_eq!(m.len(), 2, "what was queued stays");
        }
        limits.set(QueueLimits {
            max_messages: 3,
            max_bytes: 1 << 20,
            backpressure: false,
        });
        assert!(a.push(d(4, QoS::AtLeastOnce)).is_ok());
    }

    #[test]
    fn drains_in_arrival_order_across_qos() {
        let m = online(10);
        for (n, q) in [
            (1, QoS::AtLeastOnce),
            (2, QoS::AtMostOnce),
            (3, QoS::ExactlyOnce),
        ] {
            m.push(d(n, q)).unwrap();
        }
        let mut out = VecDeque::new();
        m.drain(&mut out, 10, 10);
        assert_eq!(payloads(&out), vec![1, 2, 3]);
    }

    #[test]
    fn qos0_passes_a_full_window_but_qos1_waits() {
        let m = online(10);
        m.push(d(1, QoS::AtLeastOnce)).unwrap();
        m.push(d(2, QoS::AtMostOnce)).unwrap();
        m.push(d(3, QoS::AtLeastOnce)).unwrap();
        let mut out = VecDeque::new();
        m.drain(&mut out, 10, 0);
        assert_eq!(payloads(&out), vec![2]);
        out.clear();
        m.drain(&mut out, 10, 1);
        assert_eq!(payloads(&out), vec![1]);
    }

    #[test]
    fn unshift_restores_the_front() {
        let m = online(10);
        for n in 1..=4 {
            m.push(d(n, QoS::AtLeastOnce)).unwrap();
        }
        let mut out = VecDeque::new();
        m.drain(&mut out, 2, 10);
        m.push(d(5, QoS::AtMostOnce)).unwrap();
        m.unshift(out.drain(..));
        m.drain(&mut out, 10, 10);
        assert_eq!(payloads(&out), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn full_queue_drops_newest_and_offline_refuses_qos0() {
        let m = online(2);
        m.push(d(1, QoS::AtLeastOnce)).unwrap();
        m.push(d(2, QoS::AtLeastOnce)).unwrap();
        assert_eq!(m.push(d(3, QoS::AtLeastOnce)), Err(Refused::Full));
        m.set_online(false);
        let m2 = Mailbox::new(QueueLimits {
            max_messages: 2,
            max_bytes: 10,
            backpressure: true,
        });
        assert_eq!(m2.push(d(1, QoS::AtMostOnce)), Err(Refused::Offline));
        assert_eq!(m.len(), 2);
    }
}

mod disk {
    use super::super::*;

    use crate::store::Scratch;

    fn d(n: u32) -> Delivery {
        Delivery::for_test(QoS::AtLeastOnce, &n.to_be_bytes())
    }

    #[test]
    fn offline_queue_lives_on_disk_and_drains_in_order() {
        let scratch = Scratch::open("mailbox");
        let store = scratch.store.clone();
        let limits = QueueLimits {
            max_messages: 100_000,
            max_bytes: 1 << 30,
            backpressure: true,
        };
        let m = Mailbox::with_store(limits, store.clone(), 9);
        m.set_persistent(true);
        m.set_online(true);
        for n in 0..10 {
            m.push(d(n)).unwrap();
        }
        m.set_online(false);
        m.spill();
        for n in 10..5000 {
            m.push(d(n)).unwrap();
        }
        // Nothing of the backlog is held in memory.
        assert!(m.lock().acked.is_empty());
        assert_eq!(m.len(), 5000);
        store.flush();
        m.set_online(true);
        let mut out = VecDeque::new();
        let mut got = Vec::new();
        while got.len() < 5000 {
            assert!(m.drain(&mut out, 300, 300));
            assert!(!out.is_empty(), "stalled after {}", got.len());
            for x in out.drain(..) {
                got.push(u32::from_be_bytes(x.msg.payload[..].try_into().unwrap()));
            }
        }
        assert_eq!(got, (0..5000).collect::<Vec<_>>());
        assert!(m.is_empty());
    }

    /// Publishers keep pushing while the connection reads the disk tail back (the read
    /// happens without the queue's lock): everything arrives once, in order.
    #[test]
    fn pushes_during_disk_reads_keep_order() {
        let scratch = Scratch::open("mailbox-race");
        let store = scratch.store.clone();
        let limits = QueueLimits {
            max_messages: 100_000,
            max_bytes: 1 << 30,
            backpressure: false,
        };
        let m = Arc::new(Mailbox::with_store(limits, store.clone(), 11));
        m.set_persistent(true);
        for n in 0..3000 {
            m.push(d(n)).unwrap();
        }
        store.flush();
        m.set_online(true);
        let pusher = {
            let m = m.clone();
            std::thread::spawn(move || {
                for n in 3000..6000 {
                    m.push(d(n)).unwrap();
                }
            })
        };
        let mut out = VecDeque::new();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while got.len() < 6000 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of 6000",
                got.len()
            );
            if !m.drain(&mut out, 300, 300) || out.is_empty() {
                // Not committed yet.
                store.flush();
            }
            for x in out.drain(..) {
                got.push(u32::from_be_bytes(x.msg.payload[..].try_into().unwrap()));
            }
        }
        pusher.join().unwrap();
        assert_eq!(got, (0..6000).collect::<Vec<_>>());
        assert!(m.is_empty());
    }

    /// A shared delivery no other member took is put back at the front, ahead of older
    /// ones; spilled to disk, the session still gets every message when it comes back,
    /// in the order they arrived.
    #[test]
    fn spilling_after_a_shared_delivery_came_back_loses_nothing() {
        let scratch = Scratch::open("mailbox-spill");
        let store = scratch.store.clone();
        let limits = QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            backpressure: false,
        };
        let m = Mailbox::with_store(limits, store.clone(), 12);
        m.set_persistent(true);
        m.set_online(true);
        for n in 0..4 {
            let mut x = d(n);
            if n == 3 {
                x.shared = Some(crate::codec::TopicFilter::new("$share/g/t").unwrap());
            }
            m.push(x).unwrap();
        }
        let back = m.extract(|x| x.shared.is_some());
        m.unshift(back.into_iter());
        m.set_online(false);
        m.spill();
        store.flush();
        m.set_online(true);
        let mut out = VecDeque::new();
        assert!(m.drain(&mut out, 10, 10));
        let got: Vec<u32> = (out.iter())
            .map(|x| u32::from_be_bytes(x.msg.payload[..].try_into().unwrap()))
            .collect();
        assert_eq!(got, [0, 1, 2, 3]);
        assert!(m.is_empty());
    }
}

mod size {
    use super::super::*;

    /// Every session has a mailbox, shared with the router (an `Arc`, 16 bytes of counts before
    /// it): 112 bytes with them, one of the allocator's size classes (the next is 128). Its queue is made only
    /// when something is queued, so an idle client that gets nothing never has one.
    #[test]
    fn an_idle_mailbox_stays_small_and_makes_no_queue() {
        let size = std::mem::size_of::<Mailbox>();
        assert!(size + 16 <= 112, "Mailbox is {size} bytes");
        let m = Mailbox::new(QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            backpressure: true,
        });
        m.set_online(true);
        let mut out = VecDeque::new();
        assert!(m.drain(&mut out, 10, 10));
        assert!(out.is_empty() && m.is_empty());
        assert_eq!(m.room_left(), (100, 1 << 20));
        m.wake();
        m.unshift(std::iter::empty());
        assert!(m.extract(|_| true).is_empty());
        m.set_online(false);
        m.spill();
        assert!(m.peek().is_none(), "an idle mailbox made its queue");
    }
}
