//! Session storage implementations of [`crate::session::TokenStore`].

pub mod redis;

pub use self::redis::{RedisSettings, RedisStore};
