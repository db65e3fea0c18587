//! A minimal MC146818 CMOS RTC at ports 0x70 (index) / 0x71 (data): the current UTC time
//! in BCD, 24-hour mode, "update in progress" never set. Its point is that Linux reads a
//! sane time at once: an absent RTC (all 0xff) costs Linux 6.1 a one-second wait at boot.
//! It keeps no alarm, no periodic interrupt and no NVRAM beyond what is written to it.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::bus::BusDevice;

/// First port of the RTC.
pub(crate) const RTC_BASE: u64 = 0x70;
/// Its range length.
pub(crate) const RTC_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
const CMOS_SIZE: usize = 128;

/// A civil UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    /// Full year.
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 1 (Sunday) ..= 7, the RTC's convention.
    pub weekday: u32,
}

/// Converts seconds since the Unix epoch to a UTC date (Howard Hinnant's civil_from_days).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // values are in range by construction
pub(crate) fn datetime_from_unix(secs: u64) -> DateTime {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    DateTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday (5 in 1 = Sunday numbering).
        weekday: ((days + 4).rem_euclid(7) + 1) as u32,
    }
}

#[allow(clippy::cast_possible_truncation)] // callers pass values below 100
fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// The CMOS RTC.
#[derive(Debug)]
pub(crate) struct Rtc {
    index: u8,
    nvram: [u8; CMOS_SIZE],
    now: fn() -> u64,
}

fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(system_now)
    }
}

impl Rtc {
    /// An RTC reading time from `now` (seconds since the epoch); tests pass a fixed clock.
    pub(crate) fn with_clock(now: fn() -> u64) -> Self {
        Self {
            index: 0,
            nvram: [0; CMOS_SIZE],
            now,
        }
    }

    fn register(&self, index: u8) -> u8 {
        let t = datetime_from_unix((self.now)());
        match index {
            REG_SECONDS => bcd(t.second),
            REG_MINUTES => bcd(t.minute),
            REG_HOURS => bcd(t.hour),
            REG_WEEKDAY => bcd(t.weekday),
            REG_DAY => bcd(t.day),
            REG_MONTH => bcd(t.month),
            REG_YEAR => bcd(t.year % 100),
            REG_CENTURY => bcd(t.year / 100),
            REG_STATUS_A => 0x26, // 32.768 kHz base, 1.024 kHz rate, UIP clear
            REG_STATUS_B => 0x02, // 24-hour, BCD, no interrupts
            REG_STATUS_C => 0x00,
            REG_STATUS_D => 0x80, // battery good
            i => self.nvram[usize::from(i) % CMOS_SIZE],
        }
    }
}

impl BusDevice for Rtc {
    fn name(&self) -> &'static str {
        "rtc"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 1 {
            self.register(self.index)
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = v & 0x7f;
        } else if self.index > REG_STATUS_D && self.index != REG_CENTURY {
            self.nvram[usize::from(self.index)] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_known_dates_convert() {
        let e = datetime_from_unix(0);
        assert_eq!(
            (e.year, e.month, e.day, e.hour, e.weekday),
            (1970, 1, 1, 0, 5)
        );
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let d = datetime_from_unix(1_709_210_096);
        assert_eq!(
            (d.year, d.month, d.day, d.hour, d.minute, d.second),
            (2024, 2, 29, 12, 34, 56)
        );
        assert_eq!(d.weekday, 5);
        // 2026-11-29 was a Sunday.
        let s = datetime_from_unix(1_795_910_400);
        assert_eq!((s.year, s.month, s.day, s.weekday), (2026, 11, 29, 1));
    }

    fn read_reg(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index | 0x80]);
        let mut d = [0u8];
        rtc.read(1, &mut d);
        d[0]
    }

    #[test]
    fn registers_are_bcd_time_and_never_updating() {
        let mut rtc = Rtc::with_clock(|| 1_709_210_096);
        assert_eq!(read_reg(&mut rtc, REG_SECONDS), 0x56);
        assert_eq!(read_reg(&mut rtc, REG_MINUTES), 0x34);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 0x12);
        assert_eq!(read_reg(&mut rtc, REG_DAY), 0x29);
        assert_eq!(read_reg(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(read_reg(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(read_reg(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(
            read_reg(&mut rtc, REG_STATUS_A) & 0x80,
            0,
            "UIP must be clear"
        );
        assert_eq!(read_reg(&mut rtc, REG_STATUS_B) & 0x06, 0x02, "24h BCD");
    }

    #[test]
    fn nvram_keeps_what_is_written_and_clock_is_read_only() {
        let mut rtc = Rtc::with_clock(|| 0);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(read_reg(&mut rtc, 0x40), 0xab);
        rtc.write(0, &[REG_SECONDS]);
        rtc.write(1, &[0x59]);
        assert_eq!(read_reg(&mut rtc, REG_SECONDS), 0x00);
    }
}
