// Credentials inside URLs (`nats://user:pass@host`, `nats://token@host`) must never reach a log
// line, an error message or an operator's terminal. The relay itself only ever prints URLs with
// their credentials taken out (see secrets.ts); this is the net under anything that echoes what
// the operator typed, such as commander's "argument '…' is invalid".

const REDACTED = "[redacted]";

/** One URL (or host:port) with anything before its last '@' replaced, keeping the scheme. */
export function redactUrl(url: string): string {
  const at = url.lastIndexOf("@");
  if (at < 0) return url;
  const scheme = /^[a-z][a-z0-9+.-]*:\/\//i.exec(url)?.[0] ?? "";
  return `${scheme}${REDACTED}${url.slice(at)}`;
}

/** A comma-separated list of URLs, each redacted. */
export const redactUrlList = (urls: string): string => urls.split(",").map(redactUrl).join(",");

// commander's two ways of echoing a rejected value (flag and env var). The value is everything
// between the first quote and the last "' is invalid", so a quote inside a password cannot end it early.
const ECHOED_VALUE = /((?:argument|value) ')([\s\S]*)('(?: from env '[^']*')? is invalid)/g;
// Elsewhere: scheme://userinfo@ — userinfo up to the last '@' before whitespace or a comma.
const URL_USERINFO = /(\b[a-z][a-z0-9+.-]*:\/\/)[^\s,]*@/gi;

/** Any text with the credentials of every URL in it replaced. */
export function redactCredentials(text: string): string {
  return text
    .replace(ECHOED_VALUE, (_m, pre: string, value: string, post: string) => `${pre}${value.includes("@") ? redactUrlList(value) : value}${post}`)
    .replace(URL_USERINFO, `$1${REDACTED}@`);
}
