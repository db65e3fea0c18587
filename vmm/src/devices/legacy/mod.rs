//! The PC legacy devices a microVM keeps: COM1, the i8042 controller (its reset line and
//! the answers Linux probes for), the CMOS RTC.

pub mod i8042;
pub mod rtc;
pub mod serial;
