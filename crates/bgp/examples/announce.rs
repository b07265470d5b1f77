//! Manual check against a real router: `cargo run -p herald-bgp --example
//! announce -- <peer-port> <peer-asn> <source-ip> <count> [seconds]`.
//! Announces <count> /32s from 10.0.0.0, prints the status, then withdraws
//! with an administrative shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use herald_bgp::{PeerConfig, PeerHandle, RouteAttributes, Routes, ShutdownMode};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).expect("peer port").parse().unwrap();
    let peer_asn: u32 = args.get(2).expect("peer asn").parse().unwrap();
    let src: std::net::Ipv4Addr = args.get(3).expect("source").parse().unwrap();
    let count: u32 = args.get(4).map_or(10, |c| c.parse().unwrap());
    let secs: u64 = args.get(5).map_or(5, |c| c.parse().unwrap());
    let mut cfg = PeerConfig::new("127.0.0.1".parse().unwrap(), peer_asn, 65010, src);
    cfg.peer_port = port;
    cfg.source_addr = Some(src.into());
    let h = PeerHandle::spawn(cfg).await.unwrap();
    let st = h.wait_established(Duration::from_secs(10)).await;
    println!("established: {:?}", st.map(|s| s.negotiated));
    let mut routes = Routes::new();
    for i in 0..count {
        let a = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        routes.insert(
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(a, 32).unwrap()),
            RouteAttributes::default().into(),
        );
    }
    routes.insert(
        "2001:db8::1/128".parse().unwrap(),
        RouteAttributes::default().into(),
    );
    let t = Instant::now();
    h.set_desired(routes);
    let _ = h
        .wait_for(Duration::from_secs(10), |s| {
            s.prefixes_sent > count as usize
        })
        .await;
    println!("queued in {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    println!("status: {:?}", h.status());
    h.shutdown(ShutdownMode::Withdraw {
        message: "bye".into(),
    })
    .await;
}
