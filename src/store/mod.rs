//! Session storage implementations of [`crate::session::TokenStore`].

pub mod cached;
pub mod connection;
pub mod instrumented;
pub mod invalidation;
pub mod redis;
pub mod sessions_view;

pub use self::cached::{Cached, TokenCache};
pub use self::instrumented::Instrumented;
pub use self::redis::{RedisSettings, RedisStore};

/// The store the proxy runs on: Redis, with every call timed and failures counted, behind the
/// in-process token cache (`cache.enabled`).
pub type Store = Cached<Instrumented<RedisStore>>;
