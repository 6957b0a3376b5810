//! Redis Sentinel and Cluster: the proxy follows failovers and slot moves under load.

mod common;

use std::time::{Duration, Instant};

use common::ha::{ClusterSetup, SentinelSetup};

#[test]
fn harness_starts_sentinel_and_cluster_quickly() {
    let t = Instant::now();
    let s = SentinelSetup::start(1);
    let sentinel_ready = t.elapsed();
    assert_eq!(s.master_port(), s.nodes[0].port);
    let t = Instant::now();
    let c = ClusterSetup::start(3);
    let cluster_ready = t.elapsed();
    let owner = c.owner_of("mrp:{abc}:s");
    assert!(c.nodes.iter().any(|n| n.port == owner));
    println!("sentinel ready in {sentinel_ready:?}, cluster ready in {cluster_ready:?}");
    assert!(sentinel_ready < Duration::from_secs(10));
    assert!(cluster_ready < Duration::from_secs(10));
}
