//! The one check every numeric field of a config or flag goes through: a finite number inside
//! its range, refused otherwise with the field's name, its range and the value given.

use anyhow::{bail, Result};

/// One end of a field's range.
#[derive(Debug, Clone, Copy)]
pub enum End {
    /// The value itself is allowed.
    Closed(f64),
    /// Only values strictly inside are.
    Open(f64),
    /// No bound on this side (but the number must still be finite).
    None,
}

/// Errors unless `value` is finite and within `lo`..`hi`: "'NAME' must be a finite number in
/// (0, 10], got nan".
pub fn check(name: &str, value: f64, lo: End, hi: End) -> Result<()> {
    let above = match lo {
        End::Closed(b) => value >= b,
        End::Open(b) => value > b,
        End::None => true,
    };
    let below = match hi {
        End::Closed(b) => value <= b,
        End::Open(b) => value < b,
        End::None => true,
    };
    if value.is_finite() && above && below {
        return Ok(());
    }
    let left = match lo {
        End::Closed(b) => format!("[{b}"),
        End::Open(b) => format!("({b}"),
        End::None => "(-inf".into(),
    };
    let right = match hi {
        End::Closed(b) => format!("{b}]"),
        End::Open(b) => format!("{b})"),
        End::None => "inf)".into(),
    };
    bail!("'{name}' must be a finite number in {left}, {right}, got {value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finite_and_in_range_or_named() {
        assert!(check("lr", 0.1, End::Open(0.0), End::Closed(10.0)).is_ok());
        for v in [f64::NAN, f64::INFINITY, -1.0, 0.0, 11.0] {
            let e = check("lr", v, End::Open(0.0), End::Closed(10.0)).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("'lr'") && e.contains("(0, 10]") && e.contains("got"),
                "{e}"
            );
        }
        assert!(check("x", -5.0, End::None, End::None).is_ok());
        assert!(check("x", f64::NEG_INFINITY, End::None, End::None).is_err());
    }
}
