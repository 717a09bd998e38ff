//! The frames peers exchange: their postcard encoding behind a 4-byte
//! length, read from a sealed link and written to one in batches.

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::{MAX_FRAME, TransportError};
use crate::cluster::secure::{Opener, Sealer};

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Frame {
    Request {
        id: u64,
        kind: u8,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    Reply {
        id: u64,
        #[serde(with = "reply_bytes")]
        result: Result<Vec<u8>, String>,
    },
    Oneway {
        kind: u8,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
}

/// A reply's body as bytes, not as a sequence of numbers (the same postcard
/// encoding, decoded in one copy instead of byte by byte).
mod reply_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(r: &Result<Vec<u8>, String>, s: S) -> Result<S::Ok, S::Error> {
        r.as_ref().map(|b| Bytes::new(b)).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Result<Vec<u8>, String>, D::Error> {
        Ok(Result::<ByteBuf, String>::deserialize(d)?.map(ByteBuf::into_vec))
    }
}

/// Appends `frame`, length-prefixed, to `buf`.
pub(super) fn encode_frame(frame: &Frame, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    *buf = postcard::to_extend(frame, std::mem::take(buf)).map_err(std::io::Error::other)?;
    let len = buf.len() - start - 4;
    if len > MAX_FRAME {
        buf.truncate(start);
        return Err(std::io::Error::other(TransportError::TooLarge(len)));
    }
    let len = u32::try_from(len).map_err(std::io::Error::other)?;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads the next frame from a link.
pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    link: &mut Opener<R>,
) -> std::io::Result<Frame> {
    let len = link.take(4).await?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME} byte limit"),
        ));
    }
    let body = link.take(len).await?;
    postcard::from_bytes(body).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed frame: {e}"),
        )
    })
}

pub(super) fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Request { .. } => "request",
        Frame::Reply { .. } => "reply",
        Frame::Oneway { .. } => "oneway",
    }
}

/// Bytes read from a connection at a time.
pub(super) const READ_BUFFER: usize = 64 * 1024;
/// Most bytes of queued frames gathered into one write.
const WRITE_BATCH: usize = 256 * 1024;

/// Writes the frames queued for a connection, gathering those already
/// waiting into one sealed write.
pub(super) async fn writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut sealer: Sealer,
    mut rx: mpsc::Receiver<Frame>,
) {
    let mut buf = Vec::new();
    while let Some(frame) = rx.recv().await {
        buf.clear();
        let mut next = Some(frame);
        while let Some(frame) = next {
            if let Err(e) = encode_frame(&frame, &mut buf) {
                tracing::warn!("peer frame not sent: {e}");
                return;
            }
            next = if buf.len() < WRITE_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = sealer.write_all(&mut wr, &buf).await {
            tracing::debug!("peer write failed: {e}");
            break;
        }
    }
}
