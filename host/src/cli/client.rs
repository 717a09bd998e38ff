//! A small client for the admin API, used by `plexus plugin …` and
//! `plexus cluster …`.

use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `host:port` of the node's HTTP listener.
    pub addr: String,
    /// Bearer token.
    pub token: Option<String>,
}

impl AdminClient {
    /// Sends a request and returns the JSON answer; a non-2xx answer
    /// becomes an error carrying the server's message.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.addr),
        )
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", self.addr))?
        .with_context(|| {
            format!(
                "cannot reach a node at {} (is `plexus up` running? see --addr)",
                self.addr
            )
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.addr)
            .header("content-type", content_type);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let resp = tokio::time::timeout(
            Duration::from_secs(120),
            sender.send_request(req.body(Full::new(Bytes::from(body)))?),
        )
        .await
        .map_err(|_| anyhow!("the node did not answer within 120 s"))??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&body) }));
        if !status.is_success() {
            let msg = value["error"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            return Err(match status.as_u16() {
                401 => anyhow!("{msg} (pass --token or set PLEXUS_TOKEN)"),
                _ => anyhow!("{msg} (HTTP {})", status.as_u16()),
            });
        }
        Ok(value)
    }

    /// GET returning JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.call("GET", path, "application/json", Vec::new()).await
    }
}

/// Renders rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// "3d 4h", "5m 2s", "12s".
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["kv".into(), "running".into()],
                vec!["election".into(), "restarting".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME      STATE\nkv        running\nelection  restarting\n"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m 5s");
        assert_eq!(human_duration(90_000), "1d 1h");
    }
}
