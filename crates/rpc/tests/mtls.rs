//! The server loop and client over real TLS sockets on loopback.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use oxvirt_pki::{client_config, server_config, CertAuthority, Role};
use oxvirt_rpc::jsonrpc;
use oxvirt_rpc::{serve, ClientError, Handler, HttpRequest, Limits, Reply, RpcClient};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

fn echo_handler() -> Handler {
    Arc::new(|req: HttpRequest| {
        Box::pin(async move {
            match (req.method.clone(), req.path.as_str()) {
                (Method::POST, "/jsonrpc") => match jsonrpc::parse(&req.body) {
                    Err(resp) => Reply::json(StatusCode::OK, &resp),
                    Ok(jsonrpc::Incoming::Single(Ok(call))) => {
                        let who = req.client.as_ref().map(|c| c.name.clone()).unwrap_or_default();
                        let id = call.id.unwrap_or(Value::Null);
                        if call.method == "Sleep" {
                            let ms = call.params["ms"].as_u64().unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        if call.method == "Fail" {
                            Reply::json(
                                StatusCode::OK,
                                &jsonrpc::error_response(id, &jsonrpc::RpcError::new(1, "no VM")),
                            )
                        } else {
                            Reply::json(
                                StatusCode::OK,
                                &jsonrpc::success_response(
                                    id,
                                    json!({"method": call.method, "params": call.params, "caller": who}),
                                ),
                            )
                        }
                    }
                    Ok(_) => Reply::text(StatusCode::BAD_REQUEST, "unexpected"),
                },
                (Method::GET, "/events") => {
                    let (tx, rx) = mpsc::channel(8);
                    tokio::spawn(async move {
                        for i in 0..3 {
                            let n = jsonrpc::notification("Test.event", json!({"seq": i}));
                            if tx.send(Bytes::from(format!("{n}\n"))).await.is_err() {
                                return;
                            }
                        }
                    });
                    Reply::Stream {
                        content_type: "application/x-ndjson",
                        rx,
                    }
                }
                _ => Reply::text(StatusCode::NOT_FOUND, "no such path"),
            }
        })
    })
}

struct Fixture {
    ca: CertAuthority,
    addr: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(limits: Limits) -> Fixture {
    let ca = CertAuthority::generate("test CA").unwrap();
    let node = ca.issue(Role::Node, "node-1", &["127.0.0.1".into()]).unwrap();
    let tls = Arc::new(server_config(&node, Some(Role::Engine)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, Some(tls), echo_handler(), limits, async move {
        let _ = stopped.await;
    }));
    Fixture {
        ca,
        addr,
        _stop: stop,
    }
}

fn engine_client(f: &Fixture) -> RpcClient {
    let engine = f.ca.issue(Role::Engine, "engine", &[]).unwrap();
    RpcClient::new(
        f.addr,
        "127.0.0.1",
        client_config(&f.ca.cert_pem(), Some(&engine)).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn engine_certificate_calls_and_errors_come_back_typed() {
    let f = start(Limits::default()).await;
    let c = engine_client(&f);
    let r = c.call("Host.getStats", json!({"x": 1})).await.unwrap();
    assert_eq!(
        r,
        json!({"method": "Host.getStats", "params": {"x": 1}, "caller": "engine"})
    );
    // Pooled connection reused for a second call.
    let err = c.call("Fail", json!({})).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rpc(ref e) if e.code == 1 && e.message == "no VM"),
        "{err}"
    );
}

#[tokio::test]
async fn clients_without_the_engine_certificate_are_refused() {
    let f = start(Limits::default()).await;
    // No client certificate.
    let c = RpcClient::new(
        f.addr,
        "127.0.0.1",
        client_config(&f.ca.cert_pem(), None).unwrap(),
    )
    .unwrap();
    assert!(c.call("Host.getStats", json!({})).await.is_err());
    // A certificate from another CA.
    let other = CertAuthority::generate("other CA").unwrap();
    let stranger = other.issue(Role::Engine, "engine", &[]).unwrap();
    let mut cfg_roots = f.ca.cert_pem();
    cfg_roots.push_str(&other.cert_pem());
    let c = RpcClient::new(
        f.addr,
        "127.0.0.1",
        client_config(&cfg_roots, Some(&stranger)).unwrap(),
    )
    .unwrap();
    assert!(c.call("Host.getStats", json!({})).await.is_err());
    // A node's certificate from the right CA: right chain, wrong role.
    let node2 = f.ca.issue(Role::Node, "node-2", &[]).unwrap();
    let c = RpcClient::new(
        f.addr,
        "127.0.0.1",
        client_config(&f.ca.cert_pem(), Some(&node2)).unwrap(),
    )
    .unwrap();
    assert!(c.call("Host.getStats", json!({})).await.is_err());
    // The server is still fine for the engine.
    assert!(engine_client(&f).call("Host.getStats", json!({})).await.is_ok());
}

#[tokio::test]
async fn oversized_and_malformed_bodies_get_errors() {
    let f = start(Limits {
        max_body: 1024,
        ..Limits::default()
    })
    .await;
    let c = engine_client(&f);
    let (status, _) = c
        .request(
            Method::POST,
            "/jsonrpc",
            "application/json",
            Bytes::from(vec![b' '; 4096]),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, body) = c
        .request(
            Method::POST,
            "/jsonrpc",
            "application/json",
            Bytes::from_static(b"{oops"),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], jsonrpc::PARSE_ERROR);
}

#[tokio::test]
async fn event_stream_delivers_lines_in_order() {
    let f = start(Limits::default()).await;
    let c = engine_client(&f);
    let mut rx = c.events().await.unwrap();
    for i in 0..3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev["method"], "Test.event");
        assert_eq!(ev["params"]["seq"], i);
    }
}

#[tokio::test]
async fn slow_handshakes_are_cut_off() {
    let f = start(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    // A TCP connection that never speaks TLS is closed by the server.
    let mut s = tokio::net::TcpStream::connect(f.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
    )
    .await
    .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "server should close a silent connection"
    );
}

#[tokio::test]
async fn a_handler_past_the_request_timeout_answers_504_and_the_server_serves_on() {
    let f = start(Limits {
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let c = engine_client(&f);
    let started = std::time::Instant::now();
    let e = c.call("Sleep", json!({ "ms": 5000 })).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the handler ran past its bound: {:?}",
        started.elapsed()
    );
    let text = e.to_string();
    assert!(text.contains("504") || text.contains("too long"), "{text}");
    let r = c.call("Sleep", json!({ "ms": 10 })).await.unwrap();
    assert_eq!(r["method"], "Sleep");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let f = start(Limits {
        max_connections: 2,
        handshake_timeout: Duration::from_secs(30),
        ..Limits::default()
    })
    .await;
    // Two silent connections take both slots (each waits for its TLS handshake).
    let a = tokio::net::TcpStream::connect(f.addr).await.unwrap();
    let b = tokio::net::TcpStream::connect(f.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = engine_client(&f);
    let waiting = tokio::time::timeout(Duration::from_secs(1), c.call("Host.ping", json!({}))).await;
    assert!(
        waiting.is_err(),
        "a third connection was served past the limit: {waiting:?}"
    );
    // A slot frees: the next call goes through.
    drop(a);
    let r = tokio::time::timeout(Duration::from_secs(10), c.call("Host.ping", json!({})))
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert_eq!(r["method"], "Host.ping");
    drop(b);
}
