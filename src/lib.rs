//! portals-crm keeps a customer's Salesforce org in step with the meetings booked on the BookMe
//! Partner Portal.
//!
//! The modules in the order a message flows, each depending only on those before it:
//!
//! - [`config`]: the service config and the tenant files (references to secrets, never secrets).
//! - [`amqp`]: broker connection, topology, publisher with confirms.
//! - [`event`] → [`enrich`] → [`plan`] → [`batch`] → [`salesforce`]: the stages of one booking:
//!   decode the CloudEvent, add what the caches know, render the Composite Graph, batch it per
//!   tenant, send it.
//! - [`tenants`]: the running tenants (client, batcher, breaker), their loading and reloading.
//! - [`pipeline`]: one message through those stages, to an outcome (no broker types).
//! - [`outcome`]: the fate of each outcome (one match) and the settling (ack, retry, dead letter).
//! - [`consumer`]: the AMQP consume loop, reconnects and drain.
//! - [`admin`]: the admin API over the tenants; [`service`]: wiring and lifecycle.
//! - [`sharing`]: writes refused by record-level security, recognised and given their fix
//!   (for the outcome and [`doctor`]).
//! - [`dlq`], [`doctor`]: the operators' commands. [`telemetry`]: metrics, logs, probes.
//!
//! With the `dev-tools` feature (on by default, off in the production image): [`emulator`], the
//! Salesforce the tests, the demo and the bench run against; [`demo`]; [`bench`].

pub mod admin;
pub mod amqp;
pub mod batch;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod doctor;
pub mod enrich;
pub mod event;
pub mod outcome;
pub mod pipeline;
pub mod plan;
pub mod retry_policy;
pub mod salesforce;
pub mod service;
pub mod sharing;
pub mod telemetry;
pub mod tenants;

#[cfg(feature = "dev-tools")]
pub mod bench;
#[cfg(feature = "dev-tools")]
pub mod demo;
#[cfg(feature = "dev-tools")]
pub mod emulator;
