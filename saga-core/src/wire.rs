//! Protocol v2 wire messages (being written).
