//! Health reporting shared by every plugin that depends on something outside the process.

/// How a component is doing. Reported by `/healthz`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "snake_case")]
pub enum Health {
    /// Working.
    Up,
    /// Working with reduced function; the string says what is wrong.
    Degraded(String),
    /// Not working; the string says why.
    Down(String),
}

impl Health {
    /// Whether the component can do its job at all.
    pub fn is_up(&self) -> bool {
        !matches!(self, Health::Down(_))
    }
}
