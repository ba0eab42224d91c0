//! Graceful shutdown drains in-flight requests and stops accepting new connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::Router;
use axum::routing::get;

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            "done"
        }),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kmsgate::http::serve(
        listener,
        None,
        router,
        async {
            let _ = stop_rx.await;
        },
        Duration::from_secs(5),
    ));
    let in_flight = tokio::spawn(async move { common::http(addr, "GET", "/slow", b"").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop_tx.send(()).unwrap();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, b"done");
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no new connections after shutdown");
}
