// Operation ids made in the browser: UUID version 7 (specs/protocol.md,
// "Operation ids"), 48 bits of Unix milliseconds then random bits from
// the platform's cryptographic generator.

/** A new op id from this device's clock. */
export function newOpId(nowMs = Date.now()) {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  let ms = BigInt(nowMs);
  for (let i = 5; i >= 0; i--) {
    b[i] = Number(ms & 0xffn);
    ms >>= 8n;
  }
  b[6] = 0x70 | (b[6] & 0x0f); // version 7
  b[8] = 0x80 | (b[8] & 0x3f); // variant 10
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The Unix milliseconds of a v7 op id (its first 12 hex digits). */
export function opIdTime(opId) {
  return Number.parseInt(opId.replaceAll("-", "").slice(0, 12), 16);
}
