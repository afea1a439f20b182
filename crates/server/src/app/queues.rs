//! Queues: create, change, pause and inspect them; and find (or create with
//! the defaults) the queue a new task goes to.
//!
//! SQL holds the settings; the queue's JetStream consumer enforces them
//! (`max_ack_pending`, `ack_wait`, pause) and hands the retry policy to the
//! workers in its metadata. The consumer is changed first, so a backend that
//! is down leaves the stored settings as they were.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tracing::{instrument, warn};

use super::{AppError, AppResult};
use crate::bus::Bus;
use crate::domain::{Queue, QueueSettings, QueueStats, QueueUpdate, validate_queue_name};
use crate::store::DynStore;

/// How long a replica trusts what it read of a queue's settings when booking.
const CACHE_TTL: Duration = Duration::from_secs(2);

/// A queue with its live figures.
#[derive(Debug, Clone)]
pub struct QueueDetail {
    /// The queue.
    pub queue: Queue,
    /// Its figures now.
    pub stats: QueueStats,
}

/// The queue use cases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct QueueService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: DynStore,
    bus: Bus,
    defaults: QueueSettings,
    max_attempts_limit: u32,
    cache: Mutex<HashMap<String, (Queue, Instant)>>,
}

impl QueueService {
    /// Creates the service; `defaults` are the settings of a queue created
    /// on first use, and of fields a CreateQueue leaves unset.
    pub fn new(
        store: DynStore,
        bus: Bus,
        defaults: QueueSettings,
        max_attempts_limit: u32,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                bus,
                defaults,
                max_attempts_limit,
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn remember(&self, queue: &Queue) {
        let mut cache = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.insert(queue.name.clone(), (queue.clone(), Instant::now()));
    }

    fn not_found(name: &str) -> AppError {
        AppError::NotFound {
            what: "queue",
            id: name.to_owned(),
        }
    }

    /// Returns a queue's settings if it exists, reusing what was read
    /// within the last two seconds.
    pub async fn lookup(&self, name: &str) -> AppResult<Option<Queue>> {
        {
            let cache = self
                .inner
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((queue, at)) = cache.get(name)
                && at.elapsed() < CACHE_TTL
            {
                return Ok(Some(queue.clone()));
            }
        }
        let queue = self.inner.store.get_queue(name).await?;
        if let Some(queue) = &queue {
            self.remember(queue);
        }
        Ok(queue)
    }

    /// Returns the queue a task is booked on, creating it with the defaults
    /// on first use.
    pub async fn ensure(&self, name: &str) -> AppResult<Queue> {
        if let Some(queue) = self.lookup(name).await? {
            return Ok(queue);
        }
        let now = Utc::now();
        let queue = Queue {
            name: name.to_owned(),
            settings: self.inner.defaults.clone(),
            paused: false,
            created_at: now,
            updated_at: now,
        };
        self.inner.bus.apply_queue(&queue).await?;
        if !self.inner.store.insert_queue(&queue).await? {
            // Another replica created it meanwhile; its settings stand.
            let stored = self
                .inner
                .store
                .get_queue(name)
                .await?
                .ok_or_else(|| Self::not_found(name))?;
            self.inner.bus.apply_queue(&stored).await?;
            self.remember(&stored);
            return Ok(stored);
        }
        self.remember(&queue);
        Ok(queue)
    }

    /// Creates a queue; fields `settings` leaves unset take the defaults.
    #[instrument(skip_all, fields(queue = name))]
    pub async fn create(&self, name: &str, settings: &QueueUpdate) -> AppResult<Queue> {
        validate_queue_name(name)?;
        let settings = self.inner.defaults.with(settings);
        settings.validate(self.inner.max_attempts_limit)?;
        if self.inner.store.get_queue(name).await?.is_some() {
            return Err(AppError::Exists {
                what: "queue",
                name: name.to_owned(),
            });
        }
        let now = Utc::now();
        let queue = Queue {
            name: name.to_owned(),
            settings,
            paused: false,
            created_at: now,
            updated_at: now,
        };
        self.inner.bus.apply_queue(&queue).await?;
        if !self.inner.store.insert_queue(&queue).await? {
            // Created on first use meanwhile: put its consumer back as stored.
            if let Some(stored) = self.inner.store.get_queue(name).await? {
                self.inner.bus.apply_queue(&stored).await?;
            }
            return Err(AppError::Exists {
                what: "queue",
                name: name.to_owned(),
            });
        }
        self.remember(&queue);
        Ok(queue)
    }

    /// Changes the settings `update` names; running workers follow.
    #[instrument(skip_all, fields(queue = name))]
    pub async fn update(&self, name: &str, update: &QueueUpdate) -> AppResult<Queue> {
        validate_queue_name(name)?;
        let mut queue = self.find(name).await?;
        let settings = queue.settings.with(update);
        settings.validate(self.inner.max_attempts_limit)?;
        queue.settings = settings;
        queue.updated_at = Utc::now();
        self.inner.bus.apply_queue(&queue).await?;
        if !self
            .inner
            .store
            .update_queue(name, &queue.settings, queue.updated_at)
            .await?
        {
            return Err(Self::not_found(name));
        }
        self.remember(&queue);
        Ok(queue)
    }

    /// Pauses or resumes releases to the queue's workers.
    #[instrument(skip_all, fields(queue = name, paused))]
    pub async fn set_paused(&self, name: &str, paused: bool) -> AppResult<Queue> {
        validate_queue_name(name)?;
        let mut queue = self.find(name).await?;
        queue.paused = paused;
        queue.updated_at = Utc::now();
        self.inner.bus.apply_queue(&queue).await?;
        if !self
            .inner
            .store
            .set_queue_paused(name, paused, queue.updated_at)
            .await?
        {
            return Err(Self::not_found(name));
        }
        self.remember(&queue);
        Ok(queue)
    }

    /// Returns a queue with its live figures.
    pub async fn get(&self, name: &str) -> AppResult<QueueDetail> {
        validate_queue_name(name)?;
        let queue = self.find(name).await?;
        let stats = self.inner.store.queue_stats(name, Utc::now()).await?;
        Ok(QueueDetail { queue, stats })
    }

    /// Returns every queue, by name.
    pub async fn list(&self) -> AppResult<Vec<Queue>> {
        Ok(self.inner.store.list_queues().await?)
    }

    /// Makes every queue's consumer match its stored settings (at start, in
    /// case a consumer was lost or created by a worker with its own).
    pub async fn reconcile(&self) {
        let queues = match self.inner.store.list_queues().await {
            Ok(queues) => queues,
            Err(err) => {
                warn!(error = %err, "queues not reconciled");
                return;
            }
        };
        for queue in queues {
            if let Err(err) = self.inner.bus.apply_queue(&queue).await {
                warn!(queue = queue.name, error = %err, "queue consumer not reconciled");
            }
        }
    }

    async fn find(&self, name: &str) -> AppResult<Queue> {
        self.inner
            .store
            .get_queue(name)
            .await?
            .ok_or_else(|| Self::not_found(name))
    }
}
