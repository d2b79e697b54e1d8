//! Linked IoT hubs: stored, managed through the admin API, seeded from the configuration.

use std::sync::Arc;

use provisio_core::{model::LinkedHub, text::shorten};
use provisio_proto::error::codes;
use provisio_store::{Collection, Precondition, Store};

use crate::{Error, Resource, SetupError, StoreResult};

/// Most linked hubs (DPS: 50).
pub const MAX_HUBS: u32 = 50;

/// The linked hubs of the instance.
#[derive(Clone)]
pub struct Hubs {
    store: Arc<dyn Store>,
    cache: Arc<crate::cache::TtlCache<Vec<LinkedHub>>>,
    /// What registrar URLs may point at.
    webhooks: crate::addresses::AddressPolicy,
}

fn resource(name: &str) -> Resource<'_> {
    Resource { kind: "Linked hub", id: name, not_found_code: codes::NOT_FOUND }
}

/// Checks a hub definition.
///
/// # Errors
/// A bad host name, weight or registrar URL.
pub fn validate(h: &LinkedHub) -> Result<(), Error> {
    if !provisio_pki::is_dns_name(&h.host_name) {
        return Err(Error::invalid(format!("'{}' is not a valid hub host name.", shorten(&h.host_name))));
    }
    if !(1..=1000).contains(&h.allocation_weight) {
        return Err(Error::invalid("allocationWeight must be between 1 and 1000."));
    }
    if let Some(u) = &h.registrar_webhook_url
        && !(u.starts_with("https://") || u.starts_with("http://"))
    {
        return Err(Error::invalid("registrarWebhookUrl must be an http(s) URL."));
    }
    Ok(())
}

impl Hubs {
    /// The hubs kept in `store`.
    #[must_use]
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_ttl(store, std::time::Duration::ZERO)
    }

    /// The hubs kept in `store`, cached for `ttl` (every registration reads them).
    #[must_use]
    pub fn with_ttl(store: Arc<dyn Store>, ttl: std::time::Duration) -> Self {
        Self { store, cache: Arc::new(crate::cache::TtlCache::new(ttl)), webhooks: Default::default() }
    }

    /// Refuses registrar URLs that these rules would never call (the call itself checks
    /// again, after resolving the host).
    #[must_use]
    pub fn with_webhook_addresses(mut self, a: crate::addresses::AddressPolicy) -> Self {
        self.webhooks = a;
        self
    }

    /// Adds the configured hubs that are not linked yet; on the very first start with no
    /// hub configured, links one hub named after the instance so that devices can be
    /// assigned out of the box.
    ///
    /// # Errors
    /// Store failures or an invalid configured host name.
    pub async fn seed(&self, configured: &[String], default_name: &str) -> Result<(), SetupError> {
        let seeded_before = self.store.get(Collection::Meta, "hubsSeeded").await?.is_some();
        let names: Vec<String> = match (configured.is_empty(), seeded_before) {
            (false, _) => configured.to_vec(),
            (true, false) => vec![default_name.to_owned()],
            (true, true) => Vec::new(),
        };
        for name in names {
            let hub = LinkedHub {
                host_name: name.to_ascii_lowercase(),
                allocation_weight: 1,
                apply_allocation_policy: true,
                region: None,
                registrar_webhook_url: None,
            };
            validate(&hub).map_err(|e| SetupError::Config(format!("linked hub: {e}")))?;
            let body = serde_json::to_string(&hub).map_err(|e| SetupError::Config(e.to_string()))?;
            self.store.insert_if_absent(Collection::Hubs, &hub.host_name, &body).await?;
        }
        self.store.insert_if_absent(Collection::Meta, "hubsSeeded", "true").await?;
        Ok(())
    }

    /// The names of the hubs linked in `store` (for `provisio info`).
    ///
    /// # Errors
    /// Store failures.
    pub async fn linked_names(store: &dyn Store) -> Result<Vec<String>, SetupError> {
        let docs = store.list(Collection::Hubs, None, MAX_HUBS).await?;
        Ok(docs.iter().filter_map(|d| serde_json::from_str::<LinkedHub>(&d.body).ok()).map(|h| h.host_name).collect())
    }

    /// Every linked hub, by name.
    ///
    /// # Errors
    /// Store failures.
    pub async fn list(&self) -> Result<Vec<LinkedHub>, Error> {
        let store = self.store.clone();
        let hubs = self
            .cache
            .get_or_load(|| async move {
                store
                    .list(Collection::Hubs, None, MAX_HUBS)
                    .await
                    .or_internal()?
                    .iter()
                    .map(|d| {
                        serde_json::from_str(&d.body)
                            .map_err(|e| Error::Internal(format!("stored hub is corrupt: {e}")))
                    })
                    .collect::<Result<Vec<LinkedHub>, Error>>()
            })
            .await?;
        Ok(hubs.as_ref().clone())
    }

    /// One hub.
    ///
    /// # Errors
    /// 404.
    pub async fn get(&self, name: &str) -> Result<LinkedHub, Error> {
        let d = self
            .store
            .get(Collection::Hubs, &name.to_ascii_lowercase())
            .await
            .or_internal()?
            .ok_or_else(|| resource(name).not_found())?;
        serde_json::from_str(&d.body).map_err(|e| Error::Internal(format!("stored hub is corrupt: {e}")))
    }

    /// Links or updates a hub.
    ///
    /// # Errors
    /// Invalid definition; more than [`MAX_HUBS`].
    pub async fn put(&self, name: &str, mut hub: LinkedHub) -> Result<LinkedHub, Error> {
        if !hub.host_name.is_empty() && !hub.host_name.eq_ignore_ascii_case(name) {
            return Err(Error::invalid("The body's hostName does not match the name in the path."));
        }
        hub.host_name = name.to_ascii_lowercase();
        validate(&hub)?;
        if let Some(u) = &hub.registrar_webhook_url {
            self.webhooks.check_stored(u).map_err(|why| Error::invalid(format!("registrarWebhookUrl {why}.")))?;
        }
        let exists = self.store.get(Collection::Hubs, &hub.host_name).await.or_internal()?.is_some();
        if !exists && self.list().await?.len() >= MAX_HUBS as usize {
            return Err(Error::invalid(format!("An instance links at most {MAX_HUBS} hubs.")));
        }
        let body = serde_json::to_string(&hub).map_err(|e| Error::Internal(e.to_string()))?;
        self.store.put(Collection::Hubs, &hub.host_name, &body, Precondition::Any).await.about(&resource(name))?;
        self.cache.invalidate();
        tracing::info!(hub = %hub.host_name, weight = hub.allocation_weight, "linked hub written");
        Ok(hub)
    }

    /// Unlinks a hub (devices assigned to it stay assigned until they re-register).
    ///
    /// # Errors
    /// 404.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        self.store.delete(Collection::Hubs, &name.to_ascii_lowercase(), None).await.about(&resource(name))?;
        self.cache.invalidate();
        Ok(())
    }
}
