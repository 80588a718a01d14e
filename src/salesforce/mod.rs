//! Salesforce: OAuth token per tenant, the REST client, wire models, and the classification of
//! every result into success / superseded / transient / permanent.

pub mod auth;
pub mod circuit;
pub mod client;
pub mod endpoint;
pub mod error;
pub mod model;
pub mod signin;

pub use auth::Credentials;
pub use circuit::CircuitBreaker;
pub use client::{ApiUsage, Described, OrgEndpoint, SalesforceClient};
pub use error::{Class, SalesforceError};
pub use signin::SignInRefused;
