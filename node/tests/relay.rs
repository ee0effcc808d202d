//! Relayed paths over real QUIC sockets on loopback. A seeder holds a
//! reservation at a relay (`--relay-via`, as a node behind a firewall
//! would), and a consumer connects to it through that relay (on loopback
//! every node can also be dialed directly, so the test asks for the relayed
//! path itself; `tests/netns.rs` has NATs that leave no other way): the
//! completion streams over the relayed path, greedy-identical to the
//! seeder's own answer, and the relay's capture of everything it forwarded
//! holds neither the prompt nor the reply. A relay whose allow list leaves
//! the seeder out refuses its reservation.

use std::time::{Duration, Instant};

use serde_json::json;

mod common;
use common::{client, get_json, metric_value, plain_node, stream_chat, TEST_POW_BITS};

fn relay_config(
    dir: &std::path::Path,
    relay: hypha_node::services::relay_server::RelayConfig,
    bootstrap: Vec<hypha_node::net::addr::PeerAddr>,
) -> hypha_node::NodeConfig {
    let mut cfg = hypha_node::NodeConfig::new(None);
    cfg.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.to_owned());
    cfg.pow_bits = TEST_POW_BITS;
    cfg.bootstrap = bootstrap;
    cfg.relay = Some(relay);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_reserved_at_a_relay_is_reached_through_it_in_ciphertext() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let capture = dirs[0].path().join("relay.capture");
    let relay = hypha_node::Node::start(relay_config(
        dirs[0].path(),
        hypha_node::services::relay_server::RelayConfig {
            capture: Some(capture.clone()),
            ..Default::default()
        },
        Vec::new(),
    ))
    .await
    .unwrap();
    let relay_addr = relay.peer_addr().unwrap();
    // A relay that serves one other node only.
    let fenced = hypha_node::Node::start(relay_config(
        dirs[1].path(),
        hypha_node::services::relay_server::RelayConfig {
            allow: vec![hypha_wire::NodeId([7; 32])],
            ..Default::default()
        },
        vec![relay_addr.clone()],
    ))
    .await
    .unwrap();

    let mut cfg = common::seeder_config(2, 8, dirs[2].path(), "127.0.0.1:0".parse().unwrap());
    cfg.bootstrap = vec![relay_addr.clone()];
    cfg.relay_via = vec![relay_addr.clone(), fenced.peer_addr().unwrap()];
    let seeder = hypha_node::Node::start(cfg).await.unwrap();
    let seeder_id = seeder.id().unwrap().to_string();
    let c = client();
    let seeder_base = format!("http://{}", seeder.http_addr());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let net = get_json(&c, &format!("{seeder_base}/v1/network")).await;
        let held = net["relay"]["reserved_at"].to_string();
        if held.contains(&relay_addr.id.to_string()) {
            assert!(
                !held.contains(&fenced.id().unwrap().to_string()),
                "the fenced relay took a node it does not serve: {held}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no reservation: {net}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fenced_metrics = common::metrics(&c, &format!("http://{}", fenced.http_addr())).await;
    assert!(metric_value(&fenced_metrics, "hypha_relay_refused_total") >= 1);
    assert_eq!(metric_value(&fenced_metrics, "hypha_relay_reservations"), 0);

    let consumer = plain_node(dirs[3].path(), vec![relay_addr.clone()]).await;
    let consumer_base = format!("http://{}", consumer.http_addr());
    let prompt = "Name three colors.";
    let body = json!({
        "model": "default",
        "stream": true,
        "max_tokens": 16,
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    });
    // The seeder's record must be in the DHT with its relay before the
    // consumer looks: poll through the consumer until it is listed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let models = get_json(&c, &format!("{consumer_base}/v1/models")).await;
        if models.to_string().contains("default") {
            break;
        }
        assert!(Instant::now() < deadline, "model never listed: {models}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let started = Instant::now();
    consumer
        .peers()
        .unwrap()
        .dialer()
        .relayed(seeder.id().unwrap(), &relay_addr, true)
        .await
        .expect("a relayed path");
    let setup_took = started.elapsed();
    let relayed = stream_chat(&c, &consumer_base, &body).await;
    let local = stream_chat(&c, &seeder_base, &body).await;
    assert_eq!(relayed.text, local.text);
    assert!(relayed.text.trim().len() >= 8, "{:?}", relayed.text);

    let net = get_json(&c, &format!("{consumer_base}/v1/network")).await;
    let conn = net["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == seeder_id.as_str())
        .unwrap_or_else(|| panic!("no connection to the seeder: {net}"))
        .clone();
    assert_eq!(conn["path"], "relayed", "{conn}");
    assert_eq!(conn["via"], relay_addr.id.to_string().as_str(), "{conn}");

    // A second request reuses the relayed connection.
    let again = stream_chat(&c, &consumer_base, &body).await;
    assert_eq!(again.text, local.text);

    let forwarded = std::fs::read(&capture).unwrap();
    assert!(forwarded.len() > 2000, "{} bytes", forwarded.len());
    for plain in [prompt, relayed.text.trim()] {
        assert!(
            !forwarded
                .windows(plain.len())
                .any(|w| w == plain.as_bytes()),
            "the relay saw {plain:?}"
        );
    }
    let metrics = common::metrics(&c, &consumer_base).await;
    assert_eq!(metric_value(&metrics, "hypha_relayed_connections_total"), 1);
    assert!(metric_value(&metrics, "hypha_relayed_received_bytes_total") > 1000);
    let relay_metrics = common::metrics(&c, &format!("http://{}", relay.http_addr())).await;
    assert!(
        metric_value(&relay_metrics, "hypha_relay_forwarded_bytes_total") >= forwarded.len() as u64
    );
    assert_eq!(
        metric_value(&relay_metrics, "hypha_relay_sessions_total"),
        1
    );
    println!(
        "relayed {:?}: path set up in {:.1} ms; the relay forwarded {} bytes, none of them \
         plaintext",
        relayed.text,
        setup_took.as_secs_f64() * 1000.0,
        forwarded.len()
    );
    for n in [consumer, seeder, fenced, relay] {
        n.stop().await.unwrap();
    }
}
