/** The README console-block parser and shape comparison the walkthrough test relies on. */
import { parseWalkthroughs, shapeMismatch } from '../support/readme-blocks';

describe('README console blocks', () => {
  const readme = [
    '# x',
    '## Session',
    'text',
    '```console',
    '$ a --x 1 \\',
    '  --y',
    'out 1',
    '...',
    '$ b',
    '```',
    '## Other',
    '```console',
    '$ c',
    '```',
  ].join('\n');

  it('parses the section blocks into commands (continuations joined) and the lines under them', () => {
    expect(parseWalkthroughs(readme, 'Session')).toEqual([
      [
        { command: 'a --x 1 \\\n  --y', expected: ['out 1', '...'] },
        { command: 'b', expected: [] },
      ],
    ]);
  });

  it('compares shapes: numbers, ids and host words vary, words and line order do not', () => {
    expect(
      shapeMismatch(['loaded 394 bytes into 0a748e91-... at 0x1000'], ['loaded 12 bytes into 521b8250-daf3-4547-bb38-3e23d84c69c3 at 0x2000']),
    ).toBeUndefined();
    expect(shapeMismatch(['vendor   amd', '...', 'end'], ['vendor intel', 'a', 'b', 'end'])).toBeUndefined();
    expect(shapeMismatch(['took 0.012 s'], ['took 3 s'])).toBeUndefined();
    expect(shapeMismatch([], ['surprise'])).toMatch(/1 more line\(s\) than the README shows, from: surprise/);
    expect(shapeMismatch(['1000001'], ['VCPU STATE', '1000001'])).toMatch(/not matched by "VCPU STATE"/);
    expect(shapeMismatch(['a', 'b'], ['a'])).toMatch(/"b" not matched \(the output ended\)/);
    expect(shapeMismatch(['resume 1.6 ms...'], ['resume 2 ms; throttled'])).toBeUndefined();
  });
});
