//! Form submissions, URL-encoded or multipart (certificate files), as one list of fields.

use axum::{
    extract::{FromRequest, Multipart, Request},
    http::header,
};
use provisio_engine::Error;

/// A submitted form.
#[derive(Debug, Default)]
pub(crate) struct Form {
    fields: Vec<(String, String)>,
    files: Vec<(String, Vec<u8>)>,
}

/// Most files one form may carry.
const MAX_FILES: usize = 4;

impl Form {
    /// Reads a request's form (its size is bounded by the router's body limit).
    ///
    /// # Errors
    /// `400` for a body that is not a form, `413` for one over the limit.
    pub(crate) async fn read(request: Request) -> Result<Self, Error> {
        let multipart = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
        if multipart {
            Self::read_multipart(request).await
        } else {
            let bytes = axum::body::to_bytes(request.into_body(), usize::MAX)
                .await
                .map_err(|e| Error::malformed(format!("The form could not be read: {e}")))?;
            Ok(Self::parse(&bytes))
        }
    }

    async fn read_multipart(request: Request) -> Result<Self, Error> {
        let bad = |e: String| Error::malformed(format!("The form could not be read: {e}"));
        let mut mp = Multipart::from_request(request, &()).await.map_err(|e| bad(e.body_text()))?;
        let mut form = Self::default();
        while let Some(field) = mp.next_field().await.map_err(|e| bad(e.body_text()))? {
            let name = field.name().unwrap_or_default().to_owned();
            let is_file = field.file_name().is_some();
            let data = field.bytes().await.map_err(|e| bad(e.body_text()))?;
            if is_file {
                if form.files.len() >= MAX_FILES {
                    return Err(Error::invalid(format!("A form carries at most {MAX_FILES} files.")));
                }
                if !data.is_empty() {
                    form.files.push((name, data.to_vec()));
                }
            } else {
                form.fields.push((name, String::from_utf8_lossy(&data).into_owned()));
            }
        }
        Ok(form)
    }

    /// A URL-encoded form.
    pub(crate) fn parse(bytes: &[u8]) -> Self {
        Self { fields: form_urlencoded::parse(bytes).into_owned().collect(), files: Vec::new() }
    }

    /// The first value of `name`, trimmed; `None` when absent or blank.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim()).filter(|v| !v.is_empty())
    }

    /// The first value of `name`, as typed (untrimmed); empty when absent.
    pub(crate) fn raw(&self, name: &str) -> &str {
        self.fields.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
    }

    /// Every non-blank value of `name` (checkboxes).
    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.fields.iter().filter(|(k, v)| k == name && !v.trim().is_empty()).map(|(_, v)| v.trim()).collect()
    }

    /// Whether checkbox `name` is checked.
    pub(crate) fn checked(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The uploaded file `name` (absent when none was chosen).
    pub(crate) fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// An uploaded file as text (a PEM or base64 certificate), or `None` when no file was
    /// chosen. A binary `.cer` is DER: it is returned as base64, which the service API takes.
    pub(crate) fn file_text(&self, name: &str) -> Option<String> {
        let bytes = self.file(name)?;
        match std::str::from_utf8(bytes) {
            Ok(t)
                if t.contains("-----BEGIN")
                    || t.trim().bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n".contains(&b)) =>
            {
                Some(t.to_owned())
            }
            // DER (a binary .cer): base64 is what the service API takes.
            _ => Some(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoded_fields() {
        let f = Form::parse(b"a=1&hub=h1&hub=h2&blank=+&t=%3Cscript%3E");
        assert_eq!(f.get("a"), Some("1"));
        assert_eq!(f.all("hub"), ["h1", "h2"]);
        assert_eq!(f.get("blank"), None);
        assert!(f.checked("a") && !f.checked("nope"));
        assert_eq!(f.raw("t"), "<script>");
        assert_eq!(f.file("x"), None);
    }
}
