/**
 * packageVersion is read once per process: snapshot headers and a migration's switch-over (inside
 * the guest's paused window) ask for it, and the running code's version does not change under it.
 */
import fs from 'node:fs';
import { packageVersion } from '../../src/package';

describe('packageVersion', () => {
  afterEach(() => jest.restoreAllMocks());

  it('reads package.json at most once, whatever the number of calls', () => {
    const expected = (JSON.parse(fs.readFileSync(`${__dirname}/../../package.json`, 'utf8')) as { version: string }).version;
    packageVersion(); // the first call may read it
    const reads = jest.spyOn(fs, 'readFileSync');
    for (let i = 0; i < 3; i++) expect(packageVersion()).toBe(expected);
    expect(reads).not.toHaveBeenCalled();
  });
});
