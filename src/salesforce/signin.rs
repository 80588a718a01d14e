//! A refused sign-in: the token endpoint answered with an OAuth error. That is a configuration
//! fault of the tenant's org (connected app, integration user, profile), not an outage and not
//! the fault of any booking: the tenant is paused until an admin fixes it, and every booking
//! waits without spending an attempt.
//!
//! Salesforce answers a refused JWT bearer or client-credentials grant with HTTP 400 and a
//! standard OAuth error body, `{"error": "invalid_grant", "error_description": "audience is
//! invalid"}` (RFC 6749 §5.2, RFC 7523 §3.1; Salesforce Help, "OAuth 2.0 Authorization Errors",
//! <https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_flow_errors.htm>).
//! The error codes it documents are the variants of [`OAuthErrorCode`]; anything else is
//! [`OAuthErrorCode::Other`], so the reason codes stay a bounded set.

/// The OAuth `error` values Salesforce's token endpoint documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OAuthErrorCode {
    /// The grant was refused: the user has not approved (is not pre-authorized for) the
    /// consumer, the `aud` is not the login URL, the assertion is invalid or expired, the
    /// login came from outside the profile's Login IP Ranges ("IP restricted or invalid login
    /// hours"), the user is unknown, or no client-credentials user is set.
    InvalidGrant,
    /// The consumer key is not a connected app of this org ("client identifier invalid").
    InvalidClientId,
    /// Client authentication failed (client credentials: "invalid client credentials").
    InvalidClient,
    /// The consumer secret is wrong ("client secret invalid").
    InvalidClientCredentials,
    /// The request is malformed (missing parameter, not HTTPS, not POST).
    InvalidRequest,
    /// The grant type is not enabled for the connected app.
    UnsupportedGrantType,
    /// The connected app may not use this flow.
    UnauthorizedClient,
    /// The user is not admin approved to access this app.
    InvalidAppAccess,
    /// The integration user is deactivated ("user is inactive").
    InactiveUser,
    /// The org is locked, closed or suspended.
    InactiveOrg,
    /// Too many logins for this user in the last hour ("number of logins exceeded").
    RateLimitExceeded,
    /// The requested scope is not allowed.
    InvalidScope,
    /// An error code not listed above.
    Other,
}

impl OAuthErrorCode {
    /// Parses Salesforce's `error` value.
    pub fn parse(error: &str) -> Self {
        match error {
            "invalid_grant" => Self::InvalidGrant,
            "invalid_client_id" => Self::InvalidClientId,
            "invalid_client" => Self::InvalidClient,
            "invalid_client_credentials" => Self::InvalidClientCredentials,
            "invalid_request" => Self::InvalidRequest,
            "unsupported_grant_type" => Self::UnsupportedGrantType,
            "unauthorized_client" => Self::UnauthorizedClient,
            "invalid_app_access" => Self::InvalidAppAccess,
            "inactive_user" => Self::InactiveUser,
            "inactive_org" => Self::InactiveOrg,
            "rate_limit_exceeded" => Self::RateLimitExceeded,
            "invalid_scope" => Self::InvalidScope,
            _ => Self::Other,
        }
    }

    /// The failure reason code, `salesforce_auth_<error>` (a bounded metric label).
    pub fn reason_code(self) -> &'static str {
        match self {
            Self::InvalidGrant => "salesforce_auth_invalid_grant",
            Self::InvalidClientId => "salesforce_auth_invalid_client_id",
            Self::InvalidClient => "salesforce_auth_invalid_client",
            Self::InvalidClientCredentials => "salesforce_auth_invalid_client_credentials",
            Self::InvalidRequest => "salesforce_auth_invalid_request",
            Self::UnsupportedGrantType => "salesforce_auth_unsupported_grant_type",
            Self::UnauthorizedClient => "salesforce_auth_unauthorized_client",
            Self::InvalidAppAccess => "salesforce_auth_invalid_app_access",
            Self::InactiveUser => "salesforce_auth_inactive_user",
            Self::InactiveOrg => "salesforce_auth_inactive_org",
            Self::RateLimitExceeded => "salesforce_auth_rate_limit_exceeded",
            Self::InvalidScope => "salesforce_auth_invalid_scope",
            Self::Other => "salesforce_auth_other",
        }
    }

    /// Every code, for clearing a tenant's metric series.
    pub const ALL: [Self; 13] = [
        Self::InvalidGrant,
        Self::InvalidClientId,
        Self::InvalidClient,
        Self::InvalidClientCredentials,
        Self::InvalidRequest,
        Self::UnsupportedGrantType,
        Self::UnauthorizedClient,
        Self::InvalidAppAccess,
        Self::InactiveUser,
        Self::InactiveOrg,
        Self::RateLimitExceeded,
        Self::InvalidScope,
        Self::Other,
    ];
}

/// Salesforce refused to issue a token to the integration user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignInRefused {
    /// The OAuth error, classified.
    pub code: OAuthErrorCode,
    /// Salesforce's `error_description`, verbatim (it names no secret).
    pub description: String,
}

/// Salesforce's `error_description` for a login from outside the profile's Login IP Ranges
/// through a connected app that enforces IP restrictions.
pub const IP_RESTRICTED: &str = "IP restricted or invalid login hours";

impl SignInRefused {
    /// A refusal from a token response: a 4xx with an OAuth error body. A 5xx, or a body that is
    /// not an OAuth error, is the endpoint failing, not a refusal (`None`).
    pub fn from_token_response(status: u16, error: &str, description: &str) -> Option<Self> {
        if !(400..500).contains(&status) || error.is_empty() || error == UNEXPECTED_RESPONSE {
            return None;
        }
        Some(Self {
            code: OAuthErrorCode::parse(error),
            description: description.to_owned(),
        })
    }

    /// `salesforce_auth_<error>`.
    pub fn reason_code(&self) -> &'static str {
        self.code.reason_code()
    }

    /// What the customer's Salesforce admin (or the tenant file's owner) must do; `doctor`
    /// prints it and the pause is logged with it.
    pub fn fix(&self) -> &'static str {
        let description = self.description.to_ascii_lowercase();
        match self.code {
            OAuthErrorCode::InvalidGrant if description.contains("ip restricted") => {
                "add BookMe's egress IP addresses to the Login IP Ranges of the integration user's profile, or set the connected app's IP Relaxation to \"Relax IP restrictions\" (Manage Connected Apps → Edit Policies)"
            }
            OAuthErrorCode::InvalidGrant if description.contains("approved") => {
                "pre-authorize the integration user for the connected app: Permitted Users = \"Admin approved users are pre-authorized\", then add its profile or permission set (Manage Connected Apps → Manage Profiles / Manage Permission Sets)"
            }
            OAuthErrorCode::InvalidGrant if description.contains("audience") => {
                "set the tenant's org.login_url to the org's login URL (https://login.salesforce.com, https://test.salesforce.com for a sandbox, or the My Domain URL): the JWT aud must name it"
            }
            OAuthErrorCode::InvalidGrant if description.contains("client credentials user") => {
                "enable the client credentials flow on the connected app and set its Run As user to the integration user"
            }
            OAuthErrorCode::InvalidGrant => {
                "check the tenant's username and that the certificate uploaded to the connected app matches the tenant's private key; the user must exist and be active"
            }
            OAuthErrorCode::InvalidClientId => {
                "set the tenant's consumer key to the connected app's Consumer Key (App Manager → View → Manage Consumer Details)"
            }
            OAuthErrorCode::InvalidClient | OAuthErrorCode::InvalidClientCredentials => {
                "check the tenant's client id and secret: they must be the connected app's consumer key and consumer secret"
            }
            OAuthErrorCode::UnsupportedGrantType | OAuthErrorCode::UnauthorizedClient => {
                "enable the flow the tenant uses (JWT bearer: Use Digital Signatures; client credentials: Enable Client Credentials Flow) on the connected app"
            }
            OAuthErrorCode::InvalidAppAccess => {
                "assign the connected app to the integration user's profile or permission set"
            }
            OAuthErrorCode::InactiveUser => "reactivate the integration user (Setup → Users)",
            OAuthErrorCode::InactiveOrg => {
                "the org is locked, closed or suspended: the customer must contact Salesforce"
            }
            OAuthErrorCode::RateLimitExceeded => {
                "the integration user logged in too often this hour: stop other clients using it; portals-crm resumes by itself"
            }
            OAuthErrorCode::InvalidRequest
            | OAuthErrorCode::InvalidScope
            | OAuthErrorCode::Other => {
                "run `portals-crm doctor --tenant T` and check the connected app's OAuth settings against the tenant file"
            }
        }
    }
}

/// The `error` the client records when a token response is not an OAuth error body.
pub const UNEXPECTED_RESPONSE: &str = "unexpected_response";

impl std::fmt::Display for SignInRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Salesforce refused the sign-in ({}): {}",
            self.reason_code(),
            self.description
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_their_reason_codes() {
        let cases = [
            (
                400,
                "invalid_grant",
                "user hasn't approved this consumer",
                Some("salesforce_auth_invalid_grant"),
            ),
            (
                400,
                "invalid_grant",
                IP_RESTRICTED,
                Some("salesforce_auth_invalid_grant"),
            ),
            (
                400,
                "invalid_client_id",
                "client identifier invalid",
                Some("salesforce_auth_invalid_client_id"),
            ),
            (
                400,
                "inactive_user",
                "user is inactive",
                Some("salesforce_auth_inactive_user"),
            ),
            (400, "something_new", "?", Some("salesforce_auth_other")),
            (503, "server_error", "down", None),
            (400, UNEXPECTED_RESPONSE, "HTTP 400", None),
        ];
        for (status, error, description, expected) in cases {
            let refused = SignInRefused::from_token_response(status, error, description);
            assert_eq!(
                refused.as_ref().map(SignInRefused::reason_code),
                expected,
                "{status} {error}"
            );
        }
    }

    #[test]
    fn the_fix_follows_the_description() {
        let ip = SignInRefused::from_token_response(400, "invalid_grant", IP_RESTRICTED).unwrap();
        assert!(ip.fix().contains("Login IP Ranges"), "{}", ip.fix());
        let approval = SignInRefused::from_token_response(
            400,
            "invalid_grant",
            "user hasn't approved this consumer",
        )
        .unwrap();
        assert!(
            approval.fix().contains("pre-authorize"),
            "{}",
            approval.fix()
        );
    }

    #[test]
    fn reason_codes_are_distinct() {
        let mut codes: Vec<&str> = OAuthErrorCode::ALL
            .iter()
            .map(|c| c.reason_code())
            .collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), OAuthErrorCode::ALL.len());
    }
}
