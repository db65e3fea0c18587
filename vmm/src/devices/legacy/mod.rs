//! The PC legacy devices a microVM keeps: COM1, the i8042 reset line, the CMOS RTC.

pub mod i8042;
pub mod rtc;
pub mod serial;
