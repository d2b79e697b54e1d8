//! The AMQP transport: AMQP 1.0 over TLS (port 5671), or inside a WebSocket, on fe2o3-amqp,
//! as the C, C#, Java and Node SDKs speak it. A key signs a SAS token sent with SASL PLAIN (username
//! `{scope}/registrations/{id}`); an X.509 device uses no SASL, its TLS client certificate
//! is the credential. A receiver and a sender link on `{scope}/registrations/{id}` carry
//! requests marked `iotdps-operation-type` and their answers, matched by correlation id,
//! with the HTTP status in `iotdps-status`; a refused request is settled `rejected` with the
//! DPS error as its description.

use fe2o3_amqp::{
    Connection, Receiver, Sender, Session,
    connection::ConnectionHandle,
    sasl_profile::SaslProfile,
    session::SessionHandle,
    types::{
        messaging::{ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties},
        primitives::{Binary, SimpleValue, Symbol, Value},
    },
};
use fe2o3_amqp_types::definitions::Fields;

use crate::{Answer, ClientError, Options, Progress};

/// One device's connection, session and links.
struct Link {
    conn: ConnectionHandle<()>,
    session: SessionHandle<()>,
    tx: Sender,
    rx: Receiver,
}

fn network(what: &str) -> impl Fn(String) -> ClientError + '_ {
    move |e| ClientError::Network(format!("AMQP {what}: {e}"))
}

async fn connect(opts: &Options) -> Result<Link, ClientError> {
    let (host, _) = opts.host_port()?;
    let io = crate::ws::open(opts, "AMQPWSB10").await?;
    let address = format!("{}/registrations/{}", opts.scope, opts.registration_id);
    let builder =
        Connection::builder().container_id(format!("provisio-client-{}", uuid::Uuid::new_v4())).hostname(host.as_str());
    let opened = match opts.sas_token()? {
        Some(token) => {
            builder
                .sasl_profile(SaslProfile::Plain { username: address.clone(), password: token })
                .open_with_stream(io)
                .await
        }
        None => builder.open_with_stream(io).await,
    };
    let mut conn = opened.map_err(|e| match e {
        fe2o3_amqp::connection::OpenError::SaslError { .. } => ClientError::Authentication {
            credential: opts.credential.describe(),
            status: 401,
            error_code: 401_000,
            tracking_id: "-".into(),
            message: format!("SASL refused the connection: {e}"),
        },
        e => ClientError::Network(format!("AMQP open: {e}")),
    })?;
    let mut session = Session::begin(&mut conn).await.map_err(|e| network("begin")(e.to_string()))?;
    // DPS asks for the API version on both links, as the SDKs send it.
    let properties = || {
        let mut f = Fields::default();
        f.insert(Symbol::from("com.microsoft:api-version"), Value::String(opts.api_version().into()));
        f.insert(
            Symbol::from("com.microsoft:client-version"),
            Value::String(concat!("provisio-client/", env!("CARGO_PKG_VERSION")).into()),
        );
        f
    };
    let rx = Receiver::builder()
        .name(format!("{}-receiver", opts.registration_id))
        .source(address.as_str())
        .properties(properties())
        .attach(&mut session)
        .await
        .map_err(|e| network("attach")(e.to_string()))?;
    let tx = Sender::builder()
        .name(format!("{}-sender", opts.registration_id))
        .target(address.as_str())
        .properties(properties())
        .attach(&mut session)
        .await
        .map_err(|e| network("attach")(e.to_string()))?;
    Ok(Link { conn, session, tx, rx })
}

impl Link {
    /// Sends a request and waits for its answer (or its rejection).
    async fn request(&mut self, operation: Option<&str>, body: Vec<u8>) -> Result<Answer, ClientError> {
        let correlation = uuid::Uuid::new_v4().to_string();
        let mut ap = ApplicationProperties::builder();
        ap = match operation {
            None => ap
                .insert("iotdps-operation-type", SimpleValue::String("iotdps-register".into()))
                .insert("iotdps-forceRegistration", SimpleValue::Bool(false)),
            Some(id) => ap
                .insert("iotdps-operation-type", SimpleValue::String("iotdps-get-operationstatus".into()))
                .insert("iotdps-operation-id", SimpleValue::String(id.into())),
        };
        let message = Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(MessageId::String(correlation.clone())),
                correlation_id: Some(MessageId::String(correlation.clone())),
                ..Properties::default()
            }),
            application_properties: Some(ap.build()),
            body: Body::<Value>::Data(fe2o3_amqp::types::messaging::Batch::new(vec![Data(Binary::from(body))])),
            footer: None,
        };
        match self.tx.send(message).await.map_err(|e| network("send")(e.to_string()))? {
            Outcome::Accepted(_) => {}
            Outcome::Rejected(r) => {
                let e = r.error.unwrap_or_else(|| {
                    fe2o3_amqp_types::definitions::Error::new(
                        fe2o3_amqp_types::definitions::AmqpError::InternalError,
                        None,
                        None,
                    )
                });
                let info = |k: &str| e.info.as_ref().and_then(|i| i.get(&Symbol::from(k))).and_then(number);
                let description = e.description.clone().unwrap_or_default();
                let status = info("iotdps-status")
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or_else(|| rejected_status(&e.condition, &description));
                let retry = info("retry-after").or_else(|| info("Retry-After"));
                return Ok((status, retry, description.into()));
            }
            other => return Err(ClientError::Protocol(format!("the request was settled {other:?}"))),
        }
        loop {
            let delivery = self.rx.recv::<Body<Value>>().await.map_err(|e| network("receive")(e.to_string()))?;
            self.rx.accept(&delivery).await.map_err(|e| network("accept")(e.to_string()))?;
            let m = delivery.into_message();
            let same = m.properties.as_ref().and_then(|p| p.correlation_id.as_ref())
                == Some(&MessageId::String(correlation.clone()));
            if !same {
                continue;
            }
            let prop = |k: &str| m.application_properties.as_ref().and_then(|a| a.0.get(k));
            let status = prop("iotdps-status")
                .and_then(simple_number)
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| ClientError::Protocol("an AMQP answer without iotdps-status".into()))?;
            let retry = prop("retry-after").or_else(|| prop("Retry-After")).and_then(simple_number);
            let body = match m.body {
                Body::Data(batch) => batch.into_iter().flat_map(|d| d.0.into_vec()).collect(),
                Body::Value(v) => match v.0 {
                    Value::String(s) => s.into_bytes(),
                    Value::Binary(b) => b.into_vec(),
                    other => return Err(ClientError::Protocol(format!("an AMQP answer with the body {other:?}"))),
                },
                other => return Err(ClientError::Protocol(format!("an AMQP answer with the body {other:?}"))),
            };
            return Ok((status, retry, body.into()));
        }
    }

    async fn close(mut self) {
        let _ = self.tx.close().await;
        let _ = self.rx.close().await;
        let _ = self.session.end().await;
        let _ = self.conn.close().await;
    }
}

/// The HTTP status of a rejection that does not say it in `iotdps-status`: the DPS error
/// code's (`errorCode / 1000`, as the C# SDK reads it), else the condition's.
fn rejected_status(condition: &fe2o3_amqp_types::definitions::ErrorCondition, description: &str) -> u16 {
    use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};
    let from_code = serde_json::from_str::<serde_json::Value>(description)
        .ok()
        .and_then(|v| v.get("errorCode").and_then(serde_json::Value::as_u64))
        .and_then(|c| u16::try_from(c / 1000).ok())
        .filter(|s| (400..600).contains(s));
    from_code.unwrap_or(match condition {
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess) => 401,
        ErrorCondition::AmqpError(AmqpError::NotFound) => 404,
        ErrorCondition::AmqpError(AmqpError::InternalError) => 500,
        ErrorCondition::Custom(s) if s.as_str() == "com.microsoft:device-container-throttled" => 429,
        _ => 400,
    })
}

/// A number sent as an integer or as its decimal text (`retry-after` comes as a string).
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::Long(i) => u64::try_from(*i).ok(),
        Value::Uint(i) => Some(u64::from(*i)),
        Value::Ulong(i) => Some(*i),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// [`number`] of an application property.
fn simple_number(v: &SimpleValue) -> Option<u64> {
    number(&Value::from(v.clone()))
}

/// The AMQP links and the register request's body.
struct Device {
    link: Link,
    body: Vec<u8>,
}

impl crate::Requests for Device {
    async fn request(&mut self, operation: Option<&str>) -> Result<crate::Answer, ClientError> {
        self.link.request(operation, self.body.clone()).await
    }
}

/// Registers, then polls, on one connection.
pub async fn register(opts: &Options, mut progress: impl FnMut(Progress)) -> Result<crate::Registration, ClientError> {
    progress(Progress::Registering);
    let mut device = Device { link: connect(opts).await?, body: crate::registration_body(opts)? };
    let result = crate::register_and_poll(opts, &mut device, progress).await;
    device.link.close().await;
    result
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp_types::definitions::{AmqpError, ErrorCondition};

    use super::*;

    #[test]
    fn a_rejection_without_iotdps_status_takes_its_status_from_the_error() {
        let unauthorized = ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess);
        let throttled = ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled"));
        // The DPS error code decides (errorCode / 1000)…
        assert_eq!(rejected_status(&unauthorized, r#"{"errorCode":404201,"message":"x"}"#), 404);
        assert_eq!(rejected_status(&throttled, r#"{"errorCode":500001}"#), 500);
        // …else the condition; an error code that is no HTTP status is ignored.
        assert_eq!(rejected_status(&unauthorized, "not json"), 401);
        assert_eq!(rejected_status(&throttled, r#"{"errorCode":7}"#), 429);
        assert_eq!(rejected_status(&ErrorCondition::AmqpError(AmqpError::NotFound), ""), 404);
        assert_eq!(rejected_status(&ErrorCondition::AmqpError(AmqpError::InternalError), ""), 500);
        assert_eq!(rejected_status(&ErrorCondition::AmqpError(AmqpError::DecodeError), ""), 400);
    }

    #[test]
    fn numbers_come_as_integers_or_text() {
        assert_eq!(number(&Value::Int(202)), Some(202));
        assert_eq!(number(&Value::String(" 3 ".into())), Some(3));
        assert_eq!(number(&Value::Int(-1)), None);
        assert_eq!(number(&Value::String("soon".into())), None);
        assert_eq!(simple_number(&SimpleValue::Ulong(60)), Some(60));
    }
}
