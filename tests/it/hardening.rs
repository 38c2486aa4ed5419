//! The `serve` binary against hostile or unlucky clients: stalled TLS
//! handshakes, headers that never end, bodies that never arrive, and a
//! SIGTERM in the middle of a burst of admission reviews.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::PlainEnv;

/// A `serve` process with both listeners; killed on drop.
struct Served {
    child: tokio::process::Child,
    webhook: u16,
    resolver: u16,
    ca: String,
    certs: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Served {
    async fn start(env: &PlainEnv, extra: &[&str]) -> Self {
        let certs = crate::common::loopback_certs();
        let webhook = crate::common::free_port();
        let resolver = crate::common::free_port();
        let child = crate::serve_command(certs.path(), webhook, resolver)
            .args(["--insecure-registry", &env.proxy.host])
            .args(extra)
            .env("FN_IMAGE_RESOLVER_LOG_FORMAT", "json")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start serve");
        let ca = std::fs::read_to_string(certs.path().join("ca.crt")).expect("ca");
        let served = Self {
            child,
            webhook,
            resolver,
            ca,
            certs,
        };
        let ready = format!("http://127.0.0.1:{resolver}/readyz");
        for _ in 0..300 {
            if reqwest::get(&ready)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return served;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("serve did not become ready");
    }

    fn client(&self) -> reqwest::Client {
        crate::client_trusting(&self.ca)
    }

    /// Requests the server is answering, not counting this one.
    async fn in_flight(&self) -> i64 {
        let text = crate::metrics_text(&format!("http://127.0.0.1:{}", self.resolver)).await;
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix("fn_image_resolver_http_requests_in_flight "))
            .expect("in-flight gauge");
        value.trim().parse::<i64>().expect("number") - 1
    }

    async fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut text).await;
        }
        text
    }
}

/// Reads until the server closes the connection; returns what it sent.
/// Bounded at 5 s, far above the limits the tests set (at most 1 s) and
/// below the 10 s defaults, so a limit that is not applied fails the test.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a stalled connection open");
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn stalled_clients_are_cut_off_and_the_server_keeps_serving() {
    let env = PlainEnv::start().await;
    let served = Served::start(
        &env,
        &["--header-read-timeout=300ms", "--request-timeout=1s"],
    )
    .await;

    // A TLS client that connects and never says hello.
    let mut silent = TcpStream::connect(("127.0.0.1", served.webhook))
        .await
        .expect("connect");
    until_closed(&mut silent).await;

    // Headers that never end, on the plain listener.
    let mut slow = TcpStream::connect(("127.0.0.1", served.resolver))
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    until_closed(&mut slow).await;

    // HTTP/2 with prior knowledge is not spoken: closed, not kept.
    let mut h2 = TcpStream::connect(("127.0.0.1", served.resolver))
        .await
        .expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    until_closed(&mut h2).await;

    // A keep-alive connection that goes quiet after its answer: closed
    // within the header limit too, not held for the next request forever.
    let mut quiet = TcpStream::connect(("127.0.0.1", served.resolver))
        .await
        .expect("connect");
    quiet
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = until_closed(&mut quiet).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A body announced but never sent: answered 408, then closed.
    let mut stuck = TcpStream::connect(("127.0.0.1", served.resolver))
        .await
        .expect("connect");
    stuck
        .write_all(
            b"POST /v1/resolve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"images\":",
        )
        .await
        .expect("write");
    let answer = until_closed(&mut stuck).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"kind\":\"timeout\""), "{answer}");

    // Meanwhile, and after, well-behaved callers are served.
    let resp = served
        .client()
        .get(format!("https://127.0.0.1:{}/healthz", served.webhook))
        .send()
        .await
        .expect("healthz over TLS");
    assert_eq!(resp.status().as_u16(), 200);
    // The client offers h2 and HTTP/1.1 (as the API server does); the
    // webhook picks HTTP/1.1, whose every phase is under a limit.
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    let resp = reqwest::get(format!("http://127.0.0.1:{}/healthz", served.resolver))
        .await
        .expect("healthz");
    assert_eq!(resp.status().as_u16(), 200);

    // The serving certificate's expiry is published for alerting.
    let pem = std::fs::read(served.certs.path().join("tls.crt")).expect("cert");
    let (_, der) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    let cert = der.parse_x509().expect("x509");
    let metrics = crate::metrics_text(&format!("http://127.0.0.1:{}", served.resolver)).await;
    let want = format!(
        "fn_image_resolver_tls_certificate_expiry_timestamp_seconds {}",
        cert.validity().not_after.timestamp()
    );
    assert!(metrics.contains(&want), "{want} in {metrics}");
    // The 408 above is counted with the rest.
    assert!(
        metrics.contains(
            "fn_image_resolver_http_requests_total{route=\"/v1/resolve\",outcome=\"408\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_webhook_load_drains_every_review() {
    let env = PlainEnv::start().await;
    let mut served = Served::start(&env, &["--shutdown-delay=500ms"]).await;
    // Cold images behind a slow registry: every review is still resolving
    // when the signal arrives.
    env.proxy.set_delay(Duration::from_millis(700));
    let client = served.client();
    let url = format!("https://127.0.0.1:{}/mutate?timeout=10s", served.webhook);
    let body = crate::common::function_pod_review(&env.proxy.host, &env.proxy.host);
    let reviews: Vec<_> = (0..24)
        .map(|i| {
            let mut review: Value = serde_json::from_str(&body).expect("fixture");
            review["request"]["uid"] = format!("drain-{i}").into();
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let resp = client.post(url).json(&review).send().await?;
                let status = resp.status().as_u16();
                let answer: Value = resp.json().await?;
                Ok::<_, reqwest::Error>((status, answer))
            })
        })
        .collect();
    // Signal only once the server is answering all of them (with a delay
    // this short, one still on its way could meet the closed listener).
    let mut answering = 0;
    for _ in 0..400 {
        answering = served.in_flight().await;
        if answering >= 24 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(answering, 24, "reviews in flight before SIGTERM");
    let pid = served.child.id().expect("pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    for (i, review) in reviews.into_iter().enumerate() {
        let (status, answer) = review
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("review {i} was cut off by the shutdown: {e}"));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"]["uid"], format!("drain-{i}"));
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert!(
            answer["response"]["patch"].is_string(),
            "review {i} was answered without pinning: {answer}"
        );
    }
    let status = tokio::time::timeout(Duration::from_secs(20), served.child.wait())
        .await
        .expect("exits after draining")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let logs = served.stderr().await;
    assert!(logs.lines().any(|l| l.contains("\"stopped\"")), "{logs}");

    // A restart is ready again (empty cache) and answers from the registry.
    env.proxy.set_delay(Duration::ZERO);
    let restarted = Served::start(&env, &[]).await;
    let review: Value = serde_json::from_str(&body).expect("fixture");
    let answer: Value = restarted
        .client()
        .post(format!(
            "https://127.0.0.1:{}/mutate?timeout=10s",
            restarted.webhook
        ))
        .json(&review)
        .send()
        .await
        .expect("review after restart")
        .json()
        .await
        .expect("json");
    assert!(answer["response"]["patch"].is_string(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_refuses_nothing_during_the_shutdown_delay() {
    use tokio::io::AsyncBufReadExt as _;

    let env = PlainEnv::start().await;
    let mut served = Served::start(&env, &["--shutdown-delay=3s"]).await;
    let url = format!("https://127.0.0.1:{}/mutate?timeout=10s", served.webhook);
    let body: Value = serde_json::from_str(&crate::common::function_pod_review(
        &env.proxy.host,
        &env.proxy.host,
    ))
    .expect("fixture");
    let keep_alive = served.client();
    let warm = keep_alive
        .post(&url)
        .json(&body)
        .send()
        .await
        .expect("warm");
    assert_eq!(warm.status().as_u16(), 200);

    // The server's log, line by line, as it comes.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stderr = served.child.stderr.take().expect("stderr");
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = lines_tx.send(line);
        }
    });

    // Clients that open a new connection for every review, as the API
    // server does when its keep-alive connections are closed.
    let ca = reqwest::Certificate::from_pem(served.ca.as_bytes()).expect("ca");
    let fresh = reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, body) = (fresh.clone(), url.clone(), body.clone());
            let (results, stop) = (results.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let outcome = match client.post(&url).json(&body).send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            match resp.json::<Value>().await {
                                Ok(answer)
                                    if status == 200 && answer["response"]["allowed"] == true =>
                                {
                                    Ok(())
                                }
                                Ok(answer) => Err(format!("HTTP {status}: {answer}")),
                                Err(e) => Err(format!("HTTP {status}, body: {e}")),
                            }
                        }
                        Err(e) => Err(format!("{e:?}")),
                    };
                    results.lock().expect("results").push(outcome);
                }
            })
        })
        .collect();
    for _ in 0..200 {
        if results.lock().expect("results").len() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let pid = served.child.id().expect("pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let handled = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(line) = lines.recv().await {
            if line.contains("shutdown signal received") {
                return;
            }
        }
        panic!("the server's log ended before the signal was handled");
    })
    .await;
    assert!(handled.is_ok(), "the signal was handled within 5 s");
    let signalled = std::time::Instant::now();
    // Not ready from the first request after the signal, on both listeners.
    let readyz = reqwest::get(format!("http://127.0.0.1:{}/readyz", served.resolver))
        .await
        .expect("the loopback listener still answers");
    assert_eq!(readyz.status().as_u16(), 503);
    let over_tls = fresh
        .get(format!("https://127.0.0.1:{}/readyz", served.webhook))
        .send()
        .await
        .expect("the webhook listener still answers");
    assert_eq!(over_tls.status().as_u16(), 503);
    // A client on a keep-alive connection is told to re-dial.
    let resp = keep_alive
        .post(&url)
        .json(&body)
        .send()
        .await
        .expect("keep-alive review during the delay");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close")
    );

    // Keep the load on for most of the 3 s delay: nothing may fail.
    let before = results.lock().expect("results").len();
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(signalled.elapsed())).await;
    stop.cancel();
    for task in load {
        task.await.expect("load task");
    }
    let results = std::mem::take(&mut *results.lock().expect("results"));
    assert!(
        results.len() > before + 10,
        "reviews kept flowing during the delay: {} before the signal, {} in all",
        before,
        results.len()
    );
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );

    let status = tokio::time::timeout(Duration::from_secs(30), served.child.wait())
        .await
        .expect("exits after the delay and the drain")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}
