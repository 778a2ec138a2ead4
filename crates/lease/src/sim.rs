//! Simulation (written next).
