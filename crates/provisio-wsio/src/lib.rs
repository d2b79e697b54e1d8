//! A WebSocket's binary messages as one byte stream, for protocols that run over WebSockets
//! as they run over TLS (MQTT, section 6 of 3.1.1; the AMQP WebSocket binding): each write
//! goes out as one binary message, reads return the messages' bytes in order whatever their
//! boundaries, pings are the WebSocket layer's business, and a close message or the end of
//! the connection reads as the end of the stream. A text message is an error: these
//! protocols only travel in binary messages.
//!
//! [`WsIo`] wraps any WebSocket that is a `Stream` and a `Sink` of a [`Frame`] type; the
//! features `tungstenite` and `axum` provide the frames of `tokio-tungstenite` (clients) and
//! of axum's WebSocket upgrade (servers).

use std::{
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a received WebSocket message is, to a byte stream.
#[derive(Debug)]
pub enum Kind {
    /// A binary message: its bytes.
    Binary(Bytes),
    /// A ping or pong (answered by the WebSocket layer).
    Control,
    /// A text message.
    Text,
    /// A close message.
    Close,
}

/// A WebSocket message type.
pub trait Frame: Sized {
    /// A binary message of `data`.
    fn binary(data: Bytes) -> Self;
    /// What the message is.
    fn kind(self) -> Kind;
}

/// The byte stream of a WebSocket `S` of messages `M`.
pub struct WsIo<S, M> {
    ws: S,
    /// What is left of the message being read.
    pending: Bytes,
    /// The peer sent a close message, or the connection ended.
    closed: bool,
    _message: PhantomData<fn() -> M>,
}

impl<S, M> WsIo<S, M> {
    /// The byte stream of `ws`.
    pub fn new(ws: S) -> Self {
        Self { ws, pending: Bytes::new(), closed: false, _message: PhantomData }
    }
}

impl<S, M> std::fmt::Debug for WsIo<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo").field("pending", &self.pending.len()).field("closed", &self.closed).finish()
    }
}

impl<S, M, E> AsyncRead for WsIo<S, M>
where
    S: Stream<Item = Result<M, E>> + Unpin,
    M: Frame,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.ws.poll_next_unpin(cx)) {
                Some(Ok(m)) => match m.kind() {
                    Kind::Binary(data) => self.pending = data,
                    Kind::Control => {}
                    Kind::Text => {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "a text message where the protocol's binary messages were expected",
                        )));
                    }
                    Kind::Close => self.closed = true,
                },
                None => self.closed = true,
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
    }
}

impl<S, M, E> AsyncWrite for WsIo<S, M>
where
    S: Sink<M, Error = E> + Unpin,
    M: Frame,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        ready!(self.ws.poll_ready_unpin(cx)).map_err(std::io::Error::other)?;
        self.ws.start_send_unpin(M::binary(Bytes::copy_from_slice(data))).map_err(std::io::Error::other)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ws.poll_flush_unpin(cx).map_err(std::io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.ws.poll_close_unpin(cx).map_err(std::io::Error::other)
    }
}

#[cfg(feature = "tungstenite")]
impl Frame for tokio_tungstenite::tungstenite::Message {
    fn binary(data: Bytes) -> Self {
        Self::Binary(data)
    }

    fn kind(self) -> Kind {
        match self {
            Self::Binary(data) => Kind::Binary(data),
            Self::Ping(_) | Self::Pong(_) | Self::Frame(_) => Kind::Control,
            Self::Text(_) => Kind::Text,
            Self::Close(_) => Kind::Close,
        }
    }
}

#[cfg(feature = "axum")]
impl Frame for axum::extract::ws::Message {
    fn binary(data: Bytes) -> Self {
        Self::Binary(data)
    }

    fn kind(self) -> Kind {
        match self {
            Self::Binary(data) => Kind::Binary(data),
            Self::Ping(_) | Self::Pong(_) => Kind::Control,
            Self::Text(_) => Kind::Text,
            Self::Close(_) => Kind::Close,
        }
    }
}

#[cfg(all(test, feature = "tungstenite"))]
mod tests {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::{
        WebSocketStream,
        tungstenite::{Message, protocol::Role},
    };

    use super::WsIo;

    /// A client WebSocket and the server side's byte stream, in memory.
    async fn pair()
    -> (WebSocketStream<tokio::io::DuplexStream>, WsIo<WebSocketStream<tokio::io::DuplexStream>, Message>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (client, WsIo::new(server))
    }

    #[tokio::test]
    async fn messages_read_as_one_stream_and_writes_go_out_as_messages() {
        let (mut client, mut io) = pair().await;
        // A packet split over two messages, a ping between them, then the next packet.
        client.send(Message::Binary(b"\x10\x05he".to_vec().into())).await.unwrap();
        client.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
        client.send(Message::Binary(b"llo\x20\x02".to_vec().into())).await.unwrap();
        let mut got = [0u8; 9];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x05hello\x20\x02");
        io.write_all(b"\x20\x02\x00\x00").await.unwrap();
        io.flush().await.unwrap();
        // The ping was answered by the WebSocket layer before the binary message.
        assert_eq!(client.next().await.unwrap().unwrap(), Message::Pong(b"p".to_vec().into()));
        assert_eq!(client.next().await.unwrap().unwrap(), Message::Binary(b"\x20\x02\x00\x00".to_vec().into()));
        // A close message is the end of the stream.
        client.send(Message::Close(None)).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(io.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_text_message_is_an_error() {
        let (mut client, mut io) = pair().await;
        client.send(Message::Text("CONNECT".into())).await.unwrap();
        let e = io.read_u8().await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_dropped_connection_ends_the_stream_or_fails_it() {
        let (client, mut io) = pair().await;
        drop(client);
        let mut rest = Vec::new();
        // Without a close message the end is an error or an empty read, never data.
        if let Ok(n) = io.read_to_end(&mut rest).await {
            assert_eq!(n, 0);
        }
    }
}
