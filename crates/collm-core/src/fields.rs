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

/// The fields in which `run` (what a run recorded) and `now` (what a command was given)
/// differ, each as "path: the run has A, now B" (dotted paths into nested tables; arrays
/// compared whole). For errors that refuse to resume a run with other settings.
pub fn differences(run: &impl serde::Serialize, now: &impl serde::Serialize) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: the run has {a}, now {b}")),
            _ => {}
        }
    }
    let (a, b) = (serde_json::to_value(run), serde_json::to_value(now));
    let mut out = Vec::new();
    match (a, b) {
        (Ok(a), Ok(b)) => walk("", &a, &b, &mut out),
        _ => out.push("(the settings could not be compared field by field)".into()),
    }
    out
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

    #[test]
    fn differences_name_each_field_with_both_values() {
        let a = serde_json::json!({"cf": {"max_epochs": 5, "lr": 0.1, "hidden": [8]}, "seed": 1});
        let b =
            serde_json::json!({"cf": {"max_epochs": 7, "lr": 0.1, "hidden": [8, 4]}, "seed": 1});
        assert_eq!(
            differences(&a, &b),
            [
                "cf.hidden: the run has [8], now [8,4]",
                "cf.max_epochs: the run has 5, now 7"
            ]
        );
        assert!(differences(&a, &a).is_empty());
    }
}
