//! portals-crm keeps a customer's Salesforce org in step with the meetings booked on the BookMe
//! Partner Portal.
//!
//! The pipeline, one module per stage, in the order a message flows:
//! [`amqp`] → [`event`] → [`enrich`] → [`plan`] → [`batch`] → [`salesforce`] → [`outcome`].
//! [`app`] wires them together from [`config`]; [`telemetry`] observes them; [`emulator`] is the
//! Salesforce the tests, the demo and the bench run against. [`sharing`] recognises writes that
//! record-level security refused and names their fix, for the outcome and [`doctor`].

pub mod amqp;
pub mod app;
pub mod batch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod doctor;
pub mod emulator;
pub mod enrich;
pub mod event;
pub mod outcome;
pub mod plan;
pub mod retry_policy;
pub mod salesforce;
pub mod sharing;
pub mod telemetry;
