#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A started SeaweedFS stores objects for signed requests only, and leaves nothing behind.

use std::time::Duration;

#[tokio::test]
async fn stores_objects_for_signed_requests_and_cleans_up() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let fs = seaweed::SeaweedFs::start().await.unwrap();
        fs.create_bucket("datasets-eu").await.unwrap();
        fs.create_bucket("datasets-eu").await.unwrap();
        let s3 = fs.client();
        s3.put_object()
            .bucket("datasets-eu")
            .key("a/b.txt")
            .body(b"hello".to_vec().into())
            .send()
            .await
            .unwrap();
        let got = s3
            .get_object()
            .bucket("datasets-eu")
            .key("a/b.txt")
            .send()
            .await
            .unwrap();
        assert_eq!(
            got.body.collect().await.unwrap().into_bytes().as_ref(),
            b"hello"
        );

        // An anonymous request is refused: the identities config is in force.
        let url = format!("{}/datasets-eu/a/b.txt", fs.endpoint());
        let status = anonymous_get_status(&url).await;
        assert_eq!(status, 403, "anonymous GET must be refused");

        let dir = fs.dir().to_path_buf();
        drop(fs);
        assert!(!dir.exists(), "temp dir must be removed on drop");
    })
    .await
    .unwrap();
}

async fn anonymous_get_status(url: &str) -> u16 {
    // A hand-written HTTP/1.1 request: no client library that might sign anything.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let req = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}
