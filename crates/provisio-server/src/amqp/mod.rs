//! The AMQP front-end: AMQP 1.0 over TLS (port 5671). Framing, SASL, sessions and links
//! come from fe2o3-amqp's acceptor, the connection rules (SASL, link addresses, request
//! properties) from [`link`]; each request goes to [`Engine::device`], as from every
//! transport, and its answer is sent on the device's receiver link (or as a Rejected
//! outcome).
//!
//! A connection's first eight bytes after TLS decide its authentication: the SASL header
//! (`AMQP 3 1 0 0`) for symmetric keys (SASL PLAIN; EXTERNAL/ANONYMOUS also lead to the
//! TLS certificate), the plain AMQP header (`AMQP 0 1 0 0`) for X.509 devices, which send
//! no SASL layer. A refused attach closes the connection with an AMQP error; a refused
//! request is settled as Rejected with the JSON error body.

pub(crate) mod link;

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use fe2o3_amqp::{
    Sender,
    acceptor::{
        ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle, ListenerSessionHandle, SaslAcceptor,
        SessionAcceptor, sasl_acceptor::SaslServerFrame,
    },
};
use fe2o3_amqp_types::{
    definitions::Role,
    messaging::{Body, Data, Message, Target},
    performatives::Attach,
    primitives::{Array, Binary, Symbol, Value},
    sasl::{SaslChallenge, SaslCode, SaslInit, SaslOutcome, SaslResponse},
};
use provisio_engine::{
    Answer, Credential, DeviceOperation, DeviceRequest, Engine, Error, Origin, TpmChallenge, Transport,
    limits::{Admission, PerIpLimiter},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpListener,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use self::link::{Auth, Direction, Links, Operation, Refusal};
use crate::error::Dropped;

/// The SASL protocol header.
const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// The plain AMQP protocol header.
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

/// Limits of the AMQP listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmqpLimits {
    /// Simultaneous connections.
    pub max_connections: usize,
    /// Largest AMQP frame accepted (the Open's max-frame-size).
    pub max_frame_bytes: u32,
    /// Largest message accepted on the device's sender link.
    pub max_message_bytes: u64,
    /// Sessions per connection.
    pub max_sessions: u16,
    /// Links per connection.
    pub max_links: usize,
    /// TLS handshake, protocol header, SASL and Open deadline.
    pub connect_timeout: Duration,
    /// Idle timeout announced in the Open (the peer must send something, at least an
    /// empty frame, within it).
    pub idle_timeout: Duration,
}

/// Serves AMQP on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    engine: Engine,
    limits: AmqpLimits,
    per_ip: Arc<PerIpLimiter>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(tls);
    let admission = Admission::new("AMQP", limits.max_connections, per_ip);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = crate::accept(&listener, "AMQP") => accepted,
        };
        let Some(admitted) = admission.admit(peer) else { continue };
        let (acceptor, engine) = (acceptor.clone(), engine.clone());
        connections.spawn(async move {
            let _admitted = admitted;
            let deadline = tokio::time::Instant::now() + limits.connect_timeout;
            let Some(crate::tls::Accepted { stream: tls, chain }) =
                crate::tls::accept_by(&acceptor, tcp, deadline, peer, "AMQP").await
            else {
                return;
            };
            let origin = Origin::new(Transport::Amqp, Some(peer.ip()));
            match connection(tls, chain, engine, limits, deadline, origin).await {
                Ok(reason) => tracing::debug!(%peer, reason, "AMQP connection closed"),
                Err(reason) => tracing::info!(%peer, %reason, "AMQP connection refused"),
            }
        });
    }
    // Connections end with the listener (their tasks are aborted when the set drops).
    connections.shutdown().await;
}

/// The SASL side of a connection: decides on the SASL exchange (synchronously, as
/// fe2o3-amqp asks) and keeps the outcome for the connection task.
#[derive(Debug, Clone, Default)]
struct DpsSasl {
    decided: Arc<Mutex<Option<Auth>>>,
    /// SASL `TPM`: the challenge the device was sent, for the connection task to check
    /// against the enrollment and keep before anything else happens.
    tpm_sent: Arc<Mutex<Option<TpmSent>>>,
    /// SASL `TPM`, in progress (this acceptor's own copy: fe2o3-amqp keeps one per exchange).
    tpm: Option<TpmExchange>,
}

/// A TPM challenge sent over SASL, for the engine to check and keep.
#[derive(Debug, Clone)]
struct TpmSent {
    device: link::Device,
    challenge: TpmChallenge,
}

/// Where a SASL `TPM` exchange is.
#[derive(Debug, Clone)]
enum TpmExchange {
    /// The init came (device and EK); the SRK is asked for next.
    AwaitSrk { device: link::Device, ek: Vec<u8> },
    /// Challenge segments are being sent; `next` is the next one's index.
    Sending { sent: TpmSent, segments: Vec<Vec<u8>>, next: usize },
}

fn sasl_refused(mechanism: &str, why: &link::SaslRefusal) -> SaslServerFrame {
    tracing::info!(mechanism, %why, "AMQP SASL refused");
    SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Auth, additional_data: None })
}

fn sasl_challenge(bytes: Vec<u8>) -> SaslServerFrame {
    SaslServerFrame::Challenge(SaslChallenge { challenge: Binary::from(bytes) })
}

impl DpsSasl {
    /// The device's SRK came: the engine makes the challenge for its keys; its blob goes
    /// out in segments, the first one now.
    fn tpm_srk(&mut self, device: link::Device, ek: &[u8], response: &[u8]) -> SaslServerFrame {
        let Some((0, srk)) = response.split_first() else {
            return sasl_refused("TPM", &link::SaslRefusal::TpmSrkFraming);
        };
        let challenge = match TpmChallenge::new(ek, srk) {
            Ok(c) => c,
            Err(e) => return sasl_refused("TPM", &link::SaslRefusal::TpmKeys(e.to_string())),
        };
        match link::tpm_sasl_segments(challenge.blob()) {
            Ok(segments) => {
                let first = segments[0].clone();
                self.tpm = Some(TpmExchange::Sending { sent: TpmSent { device, challenge }, segments, next: 1 });
                sasl_challenge(first)
            }
            Err(why) => sasl_refused("TPM", &why),
        }
    }
}

impl SaslAcceptor for DpsSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("PLAIN"),
            Symbol::from("EXTERNAL"),
            Symbol::from("ANONYMOUS"),
            Symbol::from("TPM"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        if init.mechanism.as_str() == "TPM" {
            return match link::tpm_sasl_init(init.initial_response.as_ref().map(|b| b.as_slice())) {
                Ok((device, ek)) => {
                    self.tpm = Some(TpmExchange::AwaitSrk { device, ek });
                    // A single 0: "send your SRK".
                    sasl_challenge(vec![0])
                }
                Err(why) => sasl_refused("TPM", &why),
            };
        }
        let decision = link::sasl_init(init.mechanism.as_str(), init.initial_response.as_ref().map(|b| b.as_slice()));
        let code = match decision {
            Ok(auth) => {
                *self.decided.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(auth);
                SaslCode::Ok
            }
            Err(why) => {
                tracing::info!(mechanism = init.mechanism.as_str(), %why, "AMQP SASL refused");
                SaslCode::Auth
            }
        };
        SaslServerFrame::Outcome(SaslOutcome { code, additional_data: None })
    }

    fn on_response(&mut self, response: SaslResponse) -> SaslServerFrame {
        // PLAIN, EXTERNAL and ANONYMOUS finish with the init; only TPM goes on.
        let response = response.response.as_slice();
        match self.tpm.take() {
            None => sasl_refused("-", &link::SaslRefusal::UnexpectedResponse),
            Some(TpmExchange::AwaitSrk { device, ek }) => self.tpm_srk(device, &ek, response),
            Some(TpmExchange::Sending { sent, segments, next }) if next < segments.len() => {
                if response != [0] {
                    return sasl_refused("TPM", &link::SaslRefusal::TpmUnacknowledged);
                }
                let segment = segments[next].clone();
                self.tpm = Some(TpmExchange::Sending { sent, segments, next: next + 1 });
                sasl_challenge(segment)
            }
            Some(TpmExchange::Sending { sent, .. }) => {
                // The last segment's answer: 0 ‖ the SAS token signed with the delivered key.
                let token = match response.split_first() {
                    Some((0, t)) => std::str::from_utf8(t).ok().map(str::trim).filter(|t| !t.is_empty()),
                    _ => None,
                };
                let Some(token) = token else {
                    return sasl_refused("TPM", &link::SaslRefusal::TpmNoToken);
                };
                *self.decided.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(Auth::Sas { device: sent.device.clone(), token: token.to_owned() });
                *self.tpm_sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sent);
                SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Ok, additional_data: None })
            }
        }
    }
}

/// A stream whose first bytes were already read (the protocol header): they are
/// replayed before the rest. Everything the peer sends passes a [`link::FrameGuard`]; a
/// transfer on a link that was never attached ends the connection with an I/O error
/// before fe2o3-amqp sees it.
#[derive(Debug)]
struct Replay<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
    guard: link::FrameGuard,
}

impl<S> Replay<S> {
    fn new(head: Vec<u8>, inner: S) -> Self {
        Self { head, at: 0, inner, guard: link::FrameGuard::default() }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
        } else {
            match Pin::new(&mut self.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        if let Err(why) = self.guard.feed(&buf.filled()[before..]) {
            buf.set_filled(before);
            tracing::info!(why, "AMQP connection refused");
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What every task of one connection shares.
struct Shared {
    engine: Engine,
    links: Mutex<Links>,
    credential: Credential,
    /// What the engine keeps about the connection (its refused X.509 attempts: past the
    /// limit, requests are refused without a validation).
    connection: provisio_engine::Connection,
    /// The device's receiver links, where replies go.
    replies: tokio::sync::Mutex<Vec<Sender>>,
    limits: AmqpLimits,
    /// Transport and peer, for the audit log.
    origin: Origin,
}

impl Shared {
    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One connection: protocol header, SASL or not, Open, then sessions and links.
pub(crate) async fn connection<S>(
    mut io: S,
    chain: Vec<Vec<u8>>,
    engine: Engine,
    limits: AmqpLimits,
    deadline: tokio::time::Instant,
    origin: Origin,
) -> Result<String, Dropped>
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let mut header = [0u8; 8];
    match tokio::time::timeout_at(deadline, io.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(Dropped::Read(e)),
        Err(_) => return Err(Dropped::Timeout("protocol header")),
    }
    let stream = Replay::new(header.to_vec(), io);
    let frame = limits.max_frame_bytes.max(512);
    let channel_max = limits.max_sessions.max(1) - 1;
    let idle = u32::try_from(limits.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let (conn, auth) = match header {
        SASL_HEADER => {
            let sasl = DpsSasl::default();
            let acceptor = ConnectionAcceptor::builder()
                .container_id("provisio")
                .max_frame_size(frame)
                .channel_max(channel_max)
                .idle_time_out(idle)
                .sasl_acceptor(sasl.clone())
                .build();
            let conn = tokio::time::timeout_at(deadline, acceptor.accept(stream))
                .await
                .map_err(|_| Dropped::Timeout("SASL and Open"))?
                .map_err(|e| Dropped::Refused(format!("SASL/Open failed: {e}")))?;
            let auth = sasl.decided.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            let tpm = sasl.tpm_sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(t) = tpm {
                // The device proved nothing yet: its enrollment must have this EK, and the
                // key must be kept for the engine to check the SAS token it signed.
                let checked =
                    engine.keep_tpm_challenge(&origin, &t.device.scope, &t.device.registration_id, &t.challenge).await;
                if let Err(e) = checked {
                    let mut conn = conn;
                    return refuse(
                        &mut conn,
                        &Refusal { condition: "amqp:unauthorized-access", description: e.to_string() },
                    )
                    .await;
                }
            }
            (conn, auth)
        }
        AMQP_HEADER => {
            let acceptor = ConnectionAcceptor::builder()
                .container_id("provisio")
                .max_frame_size(frame)
                .channel_max(channel_max)
                .idle_time_out(idle)
                .build();
            let conn = tokio::time::timeout_at(deadline, acceptor.accept(stream))
                .await
                .map_err(|_| Dropped::Timeout("Open"))?
                .map_err(|e| Dropped::Refused(format!("Open failed: {e}")))?;
            (conn, Some(Auth::Certificate))
        }
        other => {
            // Say what is spoken here, then hang up (AMQP 1.0 §2.2).
            let mut io = stream.inner;
            let _ = io.write_all(&SASL_HEADER).await;
            let _ = io.shutdown().await;
            return Err(Dropped::Malformed(format!("unsupported protocol header {other:?}")));
        }
    };
    let mut conn = conn;
    let Some(auth) = auth else { return Err(Dropped::Refused("SASL ended without a decision".into())) };
    let credential = match &auth {
        Auth::Sas { token, .. } => Credential::Sas(token.clone()),
        Auth::Certificate if !chain.is_empty() => Credential::X509(chain),
        Auth::Certificate => {
            return refuse(
                &mut conn,
                &Refusal {
                    condition: "amqp:unauthorized-access",
                    description: "no SAS token (SASL PLAIN) and no TLS client certificate".into(),
                },
            )
            .await;
        }
    };
    let shared = Arc::new(Shared {
        engine,
        links: Mutex::new(Links::new(auth, limits.max_links)),
        credential,
        connection: provisio_engine::Connection::default(),
        replies: tokio::sync::Mutex::new(Vec::new()),
        limits,
        origin,
    });
    let mut sessions: JoinSet<Result<(), Refusal>> = JoinSet::new();
    let mut begun = 0u16;
    loop {
        tokio::select! {
            incoming = conn.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                begun = begun.saturating_add(1);
                if begun > limits.max_sessions {
                    return refuse(&mut conn, &Refusal {
                        condition: "amqp:resource-limit-exceeded",
                        description: format!("at most {} sessions per connection", limits.max_sessions),
                    }).await;
                }
                let acceptor = SessionAcceptor::builder()
                    .handle_max(u32::try_from(limits.max_links.max(1) - 1).unwrap_or(u32::MAX))
                    .build();
                let session = match acceptor.accept_incoming_session(incoming, &mut conn).await {
                    Ok(s) => s,
                    Err(e) => return Err(Dropped::Refused(format!("Begin failed: {e}"))),
                };
                sessions.spawn(session_task(session, shared.clone()));
            }
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Ok(Err(refusal)) = done {
                    return refuse(&mut conn, &refusal).await;
                }
            }
        }
    }
    sessions.shutdown().await;
    let _ = conn.close().await;
    Ok("peer closed the connection".into())
}

/// Closes the connection with `refusal` and reports it.
async fn refuse(conn: &mut ListenerConnectionHandle, refusal: &Refusal) -> Result<String, Dropped> {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close_with_error(refusal.to_error())).await;
    Err(Dropped::Refused(format!("{}: {}", refusal.condition, refusal.description)))
}

fn attach_address(attach: &Attach) -> (Direction, Option<String>) {
    match attach.role {
        // The device sends: requests come in on a link whose target is the device address.
        Role::Sender => (
            Direction::FromDevice,
            attach.target.as_ref().and_then(|t| Target::try_from((**t).clone()).ok()).and_then(|t| t.address),
        ),
        Role::Receiver => (Direction::ToDevice, attach.source.as_ref().and_then(|s| s.address.clone())),
    }
}

fn attach_api_version(attach: &Attach) -> Option<String> {
    let v = attach.properties.as_ref()?.get(&Symbol::from(link::API_VERSION_PROPERTY))?;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// One session: judges each attach, keeps the reply links, and runs one task per
/// request link. A refused attach ends the session with the refusal (the connection
/// closes with it).
async fn session_task(mut session: ListenerSessionHandle, shared: Arc<Shared>) -> Result<(), Refusal> {
    let acceptor = LinkAcceptor::builder().max_message_size(shared.limits.max_message_bytes).build();
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            attach = session.next_incoming_attach() => {
                let Some(attach) = attach else { break };
                let (direction, address) = attach_address(&attach);
                let api_version = attach_api_version(&attach);
                shared.links().on_attach(direction, address.as_deref(), api_version.as_deref())?;
                match acceptor.accept_incoming_attach(attach, &mut session).await {
                    Ok(LinkEndpoint::Sender(s)) => shared.replies.lock().await.push(s),
                    Ok(LinkEndpoint::Receiver(r)) => {
                        readers.spawn(reader(r, shared.clone()));
                    }
                    Err(e) => {
                        shared.links().on_detach(direction);
                        return Err(Refusal { condition: "amqp:internal-error", description: format!("attach failed: {e}") });
                    }
                }
            }
            Some(_) = readers.join_next(), if !readers.is_empty() => {
                shared.links().on_detach(Direction::FromDevice);
            }
        }
    }
    readers.shutdown().await;
    let _ = session.end().await;
    Ok(())
}

/// Reads requests from the device's sender link, serves them and settles each.
async fn reader(mut rx: fe2o3_amqp::Receiver, shared: Arc<Shared>) {
    loop {
        let delivery = match rx.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "AMQP request link ended");
                return;
            }
        };
        let request = link::parse_request(delivery.message());
        let (correlation_id, answer) = match request {
            Err((c, e)) => (c, e.answer()),
            Ok(req) if !shared.links().can_reply() => (
                req.correlation_id,
                Error::invalid(
                    "Attach a receiver link on {idScope}/registrations/{registrationId} before sending requests.",
                )
                .answer(),
            ),
            Ok(req) => (req.correlation_id, serve_request(&shared, &req.operation).await),
        };
        if !answer.is_success() {
            if let Err(e) = rx.reject(&delivery, link::rejection(answer.status, answer.retry_after, &answer.body)).await
            {
                tracing::debug!(error = %e, "AMQP reject failed");
                return;
            }
            continue;
        }
        if let Err(e) = rx.accept(&delivery).await {
            tracing::debug!(error = %e, "AMQP accept failed");
            return;
        }
        send_reply(&shared, link::reply(correlation_id, answer.status, answer.retry_after, answer.body)).await;
    }
}

/// Sends a reply on the device's (most recent) receiver link.
async fn send_reply(shared: &Shared, message: Message<Data>) {
    let mut replies = shared.replies.lock().await;
    let Some(tx) = replies.last_mut() else {
        return;
    };
    match tokio::time::timeout(Duration::from_secs(30), tx.send_batchable(message)).await {
        // The device settles replies as it pleases; nothing waits for the outcome.
        Ok(Ok(_outcome)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "AMQP reply failed; dropping the reply link");
            replies.pop();
            shared.links().on_detach(Direction::ToDevice);
        }
        Err(_) => tracing::info!("AMQP reply not sent: the device gave no credit in 30 s"),
    }
}

/// Serves one request with the engine, for the device the links name.
async fn serve_request(shared: &Shared, operation: &Operation) -> Answer {
    let (device, api_version) = {
        let links = shared.links();
        (links.device().cloned(), links.api_version().map(str::to_owned))
    };
    let Some(device) = device else {
        return Error::invalid("No link names the device.").answer();
    };
    let operation = match operation {
        // forceRegistration needs no branch: every register re-runs the allocation.
        Operation::Register { body, force: _ } => DeviceOperation::Register { body },
        Operation::Poll { operation_id } => DeviceOperation::OperationStatus { operation_id },
    };
    shared
        .engine
        .device(DeviceRequest {
            origin: shared.origin,
            scope: &device.scope,
            registration_id: &device.registration_id,
            api_version: api_version.as_deref(),
            operation,
            credential: &shared.credential,
            connection: &shared.connection,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replay_returns_the_header_then_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"rest").await.unwrap();
        drop(a);
        let mut r = Replay::new(b"AMQP".to_vec(), b);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"AMQPrest");
    }

    #[test]
    fn sasl_acceptor_keeps_the_decision() {
        let mut s = DpsSasl::default();
        let init = SaslInit {
            mechanism: Symbol::from("PLAIN"),
            initial_response: Some(b"\x000ne1/registrations/d\x00SharedAccessSignature sr=x".to_vec().into()),
            hostname: None,
        };
        assert!(matches!(s.on_init(init), SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Ok, .. })));
        assert!(matches!(s.decided.lock().unwrap().as_ref(), Some(Auth::Sas { .. })));
        let mut s = DpsSasl::default();
        let init = SaslInit { mechanism: Symbol::from("TPM"), initial_response: None, hostname: None };
        assert!(matches!(s.on_init(init), SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Auth, .. })));
        assert!(s.decided.lock().unwrap().is_none());
    }

    fn response(bytes: &[u8]) -> SaslResponse {
        SaslResponse { response: bytes.to_vec().into() }
    }

    fn challenge_bytes(f: SaslServerFrame) -> Vec<u8> {
        match f {
            SaslServerFrame::Challenge(c) => c.challenge.to_vec(),
            SaslServerFrame::Outcome(o) => panic!("an outcome, not a challenge: {o:?}"),
        }
    }

    fn refused(f: &SaslServerFrame) -> bool {
        matches!(f, SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Auth, .. }))
    }

    #[test]
    fn sasl_tpm_runs_its_exchange_and_refuses_every_wrong_step() {
        // swtpm's EK and SRK, as the fuzz corpus keeps them (their first byte is the mode).
        let ek = &include_bytes!("../../../../fuzz/corpus/tpm/ek")[1..];
        let srk = &include_bytes!("../../../../fuzz/corpus/tpm/srk")[1..];
        let init = || SaslInit {
            mechanism: Symbol::from("TPM"),
            initial_response: Some([&b"\x000ne00000001\x00tpm-1\x00"[..], ek].concat().into()),
            hostname: None,
        };
        // The whole exchange: "send the SRK", the blob's segments, then the token.
        let mut s = DpsSasl::default();
        assert_eq!(challenge_bytes(s.on_init(init())), [0]);
        let mut blob = Vec::new();
        let mut frame = s.on_response(response(&[&[0][..], srk].concat()));
        loop {
            let c = challenge_bytes(frame);
            blob.extend_from_slice(&c[1..]);
            if c[0] & 0xC0 == 0xC0 {
                break;
            }
            assert_eq!(c[0] & 0xC0, 0x80, "an interim segment");
            frame = s.on_response(response(&[0]));
        }
        assert!(blob.len() > 600 && s.decided.lock().unwrap().is_none());
        let ok = s.on_response(response(b"\x00SharedAccessSignature sr=x&sig=y&se=1&skn=registration"));
        assert!(matches!(ok, SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Ok, .. })));
        assert!(
            matches!(s.decided.lock().unwrap().as_ref(), Some(Auth::Sas { device, .. }) if device.registration_id == "tpm-1")
        );
        // What the engine is handed to keep is the challenge whose blob the device was sent.
        let sent = s.tpm_sent.lock().unwrap().clone().unwrap();
        assert_eq!((sent.device.registration_id.as_str(), sent.challenge.blob()), ("tpm-1", blob.as_slice()));
        // Wrong steps: an SRK without its 0, an SRK that is no storage key, an interim
        // segment not acknowledged with 0, a last answer without a token.
        for (srk_response, ack, last) in [
            (srk.to_vec(), &[0][..], &b"\x00t"[..]),
            ([&[0][..], &srk[..50]].concat(), &[0], b"\x00t"),
            ([&[0][..], srk].concat(), &[1], b"\x00t"),
            ([&[0][..], srk].concat(), &[0], b"\x00 "),
        ] {
            let mut s = DpsSasl::default();
            challenge_bytes(s.on_init(init()));
            let mut frame = s.on_response(response(&srk_response));
            while let SaslServerFrame::Challenge(c) = &frame {
                let last_segment = c.challenge[0] & 0xC0 == 0xC0;
                frame = s.on_response(response(if last_segment { last } else { ack }));
            }
            assert!(refused(&frame), "{frame:?}");
            assert!(s.decided.lock().unwrap().is_none() && s.tpm_sent.lock().unwrap().is_none());
        }
        // A response with no exchange in progress.
        assert!(refused(&DpsSasl::default().on_response(response(&[0]))));
    }
}
