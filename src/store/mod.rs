//! Session storage implementations of [`crate::session::TokenStore`].

pub mod connection;
pub mod instrumented;
pub mod redis;
pub mod sessions_view;

pub use self::instrumented::Instrumented;
pub use self::redis::{RedisSettings, RedisStore};

/// The store the proxy runs on: Redis, with every call timed and failures counted.
pub type Store = Instrumented<RedisStore>;
