//! The roles a principal (an API key) can have. What each role may do is the policy in
//! `crate::auth`.

use gateway_proto::UnknownValue;
use std::str::FromStr;

/// What a principal may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The platform operator: everything, on every tenant.
    Admin,
    /// Everything on one tenant, including its keys.
    Owner,
    /// Read and write resources of one tenant.
    Member,
    /// Read resources of one tenant.
    Reader,
    /// A worker pool's credentials: reports on one service in one zone.
    Worker,
}

impl Role {
    /// The value as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Owner => "owner",
            Role::Member => "member",
            Role::Reader => "reader",
            Role::Worker => "worker",
        }
    }
}

impl FromStr for Role {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "admin" => Role::Admin,
            "owner" => Role::Owner,
            "member" => Role::Member,
            "reader" => Role::Reader,
            "worker" => Role::Worker,
            other => {
                return Err(UnknownValue {
                    what: "role",
                    value: other.to_owned(),
                })
            }
        })
    }
}

impl TryFrom<String> for Role {
    type Error = UnknownValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
