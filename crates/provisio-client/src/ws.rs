//! MQTT and AMQP over WebSockets: `wss://{host}/$iothub/websocket` (port 443 by default) with
//! the subprotocol `mqtt` or `AMQPWSB10`, as the device SDKs' WebSocket transports open it
//! where only HTTPS may leave the network. The byte stream inside is the one the MQTT and
//! AMQP transports speak over TLS.

use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue},
};

use crate::{ClientError, Options, tls};

/// The WebSocket's binary messages as one byte stream.
pub type Io = provisio_wsio::WsIo<WebSocketStream<tls::Stream>, Message>;

/// Opens the WebSocket endpoint of `opts` for `protocol` (`mqtt` or `AMQPWSB10`).
pub async fn connect(opts: &Options, protocol: &'static str) -> Result<Io, ClientError> {
    let (host, port) = opts.host_port()?;
    let stream = tls::connect(opts, &[b"http/1.1"]).await?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let authority = if port == 443 { host } else { format!("{host}:{port}") };
    let mut request = format!("wss://{authority}/$iothub/websocket")
        .into_client_request()
        .map_err(|e| ClientError::Config(format!("bad endpoint: {e}")))?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(provisio_wsio::WsIo::new(ws)),
        // The service refused the upgrade: its answer says why (a DPS error body).
        Err(tungstenite::Error::Http(answer)) => Err(ClientError::from_answer(
            answer.status().as_u16(),
            answer.body().as_deref().unwrap_or_default(),
            &opts.credential,
        )),
        Err(e) => Err(ClientError::Network(format!("WebSocket to {authority}: {e}"))),
    }
}

/// The byte stream the MQTT and AMQP transports run on: TLS, or a WebSocket over TLS.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug + 'static> Stream for T {}

/// Opens the transport's byte stream: TLS to its port, or for the WebSocket transports the
/// endpoint with `protocol` (`mqtt` or `AMQPWSB10`).
pub async fn open(opts: &Options, protocol: &'static str) -> Result<Box<dyn Stream>, ClientError> {
    Ok(match opts.transport {
        crate::Transport::MqttWs | crate::Transport::AmqpWs => Box::new(connect(opts, protocol).await?),
        _ => Box::new(tls::connect(opts, &[]).await?),
    })
}
