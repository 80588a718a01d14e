//! portals-crm keeps a customer's Salesforce org in step with the meetings booked on the BookMe
//! Partner Portal.
//!
//! The pipeline, one module per stage, in the order a message flows:
//! [`amqp`] → [`event`] → [`enrich`] → [`plan`] → [`batch`] → [`salesforce`] → [`outcome`].
//! [`app`] wires them together from [`config`]; [`telemetry`] observes them; [`emulator`] is the
//! Salesforce the tests, the demo and the bench run against.

pub mod emulator;
pub mod salesforce;
pub mod telemetry;
