/**
 * vcpud addresses, one set of rules for the server (--listen, MigrateVm destinations) and vcpuctl
 * (--server, migrate --to): `unix:PATH`, `unix:///abs/path`, a bare path (starting with `/` or `.`:
 * a Unix socket), or `HOST:PORT` (`[IPv6]:PORT`); and where the socket is by default.
 *
 * Default socket, the same for vcpud and vcpuctl and independent of the current directory:
 *   $XDG_RUNTIME_DIR/vcpud/vcpud.sock   when XDG_RUNTIME_DIR is set (a user session)
 *   /run/vcpud/vcpud.sock               as root (a system service)
 *   /tmp/vcpud-UID/vcpud.sock           otherwise (tmux's rule; vcpud refuses the directory unless it owns it)
 */
import net from 'node:net';
import path from 'node:path';

export type Address = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/** What an address may look like, for error messages. */
export const ADDRESS_FORMS = 'unix:PATH, a socket path (/abs/path or ./rel/path) or HOST:PORT ([IPv6]:PORT for IPv6)';

/** sun_path holds 108 bytes including the terminating NUL. */
const MAX_UNIX_PATH_BYTES = 107;
const HOSTNAME = /^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/i;

export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase();
  if (h === 'localhost' || h === '::1') return true;
  if (h.startsWith('::ffff:')) return isLoopbackHost(h.slice(7));
  return net.isIPv4(h) && h.startsWith('127.');
}

/** Parses 'HOST:PORT' (IPv6 in brackets); throws with the reason. */
export function parseHostPort(text: string, expected = 'HOST:PORT ([IPv6]:PORT for IPv6)'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  if (!m) throw new Error(`malformed address '${text}': expected ${expected}`);
  const host = m[1] ?? m[2];
  if (m[1] !== undefined ? !net.isIPv6(host) : !(net.isIPv4(host) || HOSTNAME.test(host)))
    throw new Error(`malformed address '${text}': '${host}' is not a host name or IP address`);
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`malformed address '${text}': port ${port} is over 65535`);
  return { host, port };
}

/**
 * The absolute socket path when `text` names a Unix socket (unix:PATH, unix:///abs, or a path
 * starting with / or .), relative paths resolved against `baseDir`; undefined for anything else.
 */
export function unixSocketPath(text: string, baseDir: string = process.cwd()): string | undefined {
  let raw: string;
  if (text.startsWith('unix:')) raw = text.startsWith('unix://') ? text.slice('unix://'.length) : text.slice('unix:'.length);
  else if (text.startsWith('/') || text.startsWith('.')) raw = text;
  else return undefined;
  if (!raw) throw new Error(`malformed address '${text}': unix: needs a path`);
  const p = path.resolve(baseDir, raw);
  if (Buffer.byteLength(p) > MAX_UNIX_PATH_BYTES)
    throw new Error(`unix socket path ${p} is ${Buffer.byteLength(p)} bytes; the kernel limit is ${MAX_UNIX_PATH_BYTES}`);
  return p;
}

/** Parses an address (see the module comment); throws with the reason. */
export function parseAddress(text: string, baseDir: string = process.cwd()): Address {
  const p = unixSocketPath(text, baseDir);
  if (p !== undefined) return { kind: 'unix', path: p };
  return { kind: 'tcp', ...parseHostPort(text, ADDRESS_FORMS) };
}

/** The canonical spelling grpc-js dials and binds: 'unix:/abs', 'host:port', '[v6]:port'. */
export function formatAddress(a: Address): string {
  if (a.kind === 'unix') return `unix:${a.path}`;
  return net.isIPv6(a.host) ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

const currentUid = (): number => process.getuid?.() ?? -1;

/** The directory of vcpud's default socket (and default snapshot directory): see the module comment. */
export function defaultRuntimeDir(env: NodeJS.ProcessEnv, uid: number = currentUid()): string {
  if (env.XDG_RUNTIME_DIR) return path.resolve(env.XDG_RUNTIME_DIR, 'vcpud');
  if (uid === 0) return ROOT_RUNTIME_DIR;
  return path.join('/tmp', `vcpud-${uid}`);
}

/** Where vcpud runs as a system service; vcpuctl also looks there when its own default has no socket. */
export const ROOT_RUNTIME_DIR = '/run/vcpud';
export const SOCKET_NAME = 'vcpud.sock';

/** The default API address: a Unix socket in defaultRuntimeDir, never a TCP port. */
export function defaultSocketAddress(env: NodeJS.ProcessEnv, uid: number = currentUid()): string {
  return `unix:${path.join(defaultRuntimeDir(env, uid), SOCKET_NAME)}`;
}

/** The default rule in words, for --help texts: the directory, then the socket in it. */
export const DEFAULT_RUNTIME_DIR_RULE = `$XDG_RUNTIME_DIR/vcpud, else ${ROOT_RUNTIME_DIR} as root, else /tmp/vcpud-UID`;
export const DEFAULT_SOCKET_RULE = `unix:DIR/${SOCKET_NAME} with DIR = ${DEFAULT_RUNTIME_DIR_RULE}`;
