//! What the services exchange: the saga's input and each step's output.

use serde::{Deserialize, Serialize};

/// An order: the `place-order` saga's input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order's id; also the saga's idempotency key.
    pub id: String,
    /// Who ordered.
    pub customer: String,
    /// What: a stock-keeping unit the seller stocks.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

impl Order {
    /// Checks what a caller sent, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        fn token(field: &str, value: &str) -> Result<(), String> {
            let ok = !value.is_empty()
                && value.len() <= 64
                && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{field} {value:?} must be 1 to 64 characters of letters, digits, '-' or '_'"
                ))
            }
        }
        token("id", &self.id)?;
        token("customer", &self.customer)?;
        token("sku", &self.sku)?;
        if !(1..=MAX_QUANTITY).contains(&self.quantity) {
            return Err(format!("quantity {} must be from 1 to {MAX_QUANTITY}", self.quantity));
        }
        Ok(())
    }
}

/// The most items one order may hold.
pub const MAX_QUANTITY: u32 = 100;

/// Seller's output for `reserve-items`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The SKU reserved.
    pub sku: String,
    /// How many were reserved.
    pub quantity: u32,
    /// What was left in stock afterwards.
    pub remaining: u32,
}

/// Logistics' output for `schedule-shipment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// The shipment's id.
    pub shipment: String,
    /// The courier that takes it.
    pub courier: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        Order { id: "o-1".into(), customer: "ada".into(), sku: "apple".into(), quantity: 2 }
    }

    #[test]
    fn a_good_order_passes() {
        assert_eq!(order().validate(), Ok(()));
    }

    #[test]
    fn a_bad_order_names_the_field() {
        let e = Order { quantity: 0, ..order() }.validate().unwrap_err();
        assert!(e.starts_with("quantity 0"), "{e}");
        let e = Order { sku: "a.b".into(), ..order() }.validate().unwrap_err();
        assert!(e.starts_with("sku \"a.b\""), "{e}");
        let e = Order { id: String::new(), ..order() }.validate().unwrap_err();
        assert!(e.starts_with("id \"\""), "{e}");
        let e = Order { customer: "x".repeat(65), ..order() }.validate().unwrap_err();
        assert!(e.starts_with("customer"), "{e}");
    }
}
