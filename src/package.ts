/** Where the package lives, whether code runs from src/ (tests) or dist/src/ (built): a leaf module. */
import fs from 'node:fs';
import path from 'node:path';

/** The nearest directory at or above `from` holding a package.json. */
export function packageRoot(from: string = __dirname): string {
  let dir = from;
  while (!fs.existsSync(path.join(dir, 'package.json'))) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`no package.json above ${from}`);
    dir = up;
  }
  return dir;
}

let version: string | undefined;

/**
 * The version of the code running, read once: every snapshot header and a migration's switch-over
 * (the guest paused) asked for it, and a package.json replaced by an upgrade is not this process's.
 */
export function packageVersion(): string {
  version ??= (JSON.parse(fs.readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { version?: string }).version ?? 'unknown';
  return version;
}
