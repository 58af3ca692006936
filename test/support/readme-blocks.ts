/**
 * README console blocks as runnable steps, and the "same shape" comparison of a command's output
 * with what the README shows under it.
 *
 * Shape: lines compared in order after normalizing both sides (whitespace runs are one space, a
 * UUID and any word that starts with a digit, i.e. numbers, sizes, addresses, versions and times,
 * stand for any such word, and CPU vendor and KVM module names for any of theirs). In the README, a
 * line that is just `...` stands for any number of lines, and `...` inside a line for any text.
 */

export interface Step {
  /** The command as written after `$ ` (continuation lines joined). */
  command: string;
  /** The lines the README shows under it. */
  expected: string[];
}

/** The ```console blocks of the `## heading` section, each as its steps. */
export function parseWalkthroughs(readme: string, heading: string): Step[][] {
  const start = readme.indexOf(`\n## ${heading}\n`);
  if (start < 0) throw new Error(`README has no "## ${heading}" section`);
  const end = readme.indexOf('\n## ', start + 1);
  const section = readme.slice(start, end < 0 ? undefined : end);
  const blocks = [...section.matchAll(/\n```console\n([\s\S]*?)\n```/g)].map((m) => m[1]);
  return blocks.map(parseSteps);
}

function parseSteps(block: string): Step[] {
  const steps: Step[] = [];
  let continued = false;
  for (const line of block.split('\n')) {
    if (continued) {
      steps[steps.length - 1].command += `\n${line}`;
    } else if (line.startsWith('$ ')) {
      steps.push({ command: line.slice(2), expected: [] });
    } else {
      if (!steps.length) throw new Error(`console block output before any command: ${line}`);
      steps[steps.length - 1].expected.push(line);
    }
    continued = line.endsWith('\\') && steps.length > 0;
  }
  return steps;
}

const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/gi;
const NUMBER_WORD = /(?<![\w.])\d[\w.:+~-]*/g;
const HOST_WORDS = /\b(amd|intel|kvm_pvm|kvm_intel|kvm_amd)\b/g;
const PLACEHOLDER = '\u0000';

export function normalizeLine(line: string): string {
  return line.replace(UUID, PLACEHOLDER).replace(NUMBER_WORD, PLACEHOLDER).replace(HOST_WORDS, '\u0001').replace(/\s+/g, ' ').trim();
}

function lineMatcher(expected: string): RegExp {
  const parts = normalizeLine(expected)
    .split('...')
    .map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  return new RegExp(`^${parts.join('.*')}$`);
}

/** Undefined when `actual` has the shape of `expected`, else a description of the first difference. */
export function shapeMismatch(expected: string[], actual: string[]): string | undefined {
  const want = expected.map((l) => (l.trim() === '...' ? undefined : lineMatcher(l)));
  const have = actual.map(normalizeLine);
  // memo[i][j]: expected[i..] matches actual[j..]; `furthest` remembers the deepest expected line reached
  const memo = new Map<number, boolean>();
  let furthest = { i: 0, j: 0 };
  const match = (i: number, j: number): boolean => {
    const key = i * (have.length + 1) + j;
    const known = memo.get(key);
    if (known !== undefined) return known;
    if (i > furthest.i || (i === furthest.i && j > furthest.j)) furthest = { i, j };
    let ok: boolean;
    if (i === want.length) ok = j === have.length;
    else if (want[i] === undefined) ok = match(i + 1, j) || (j < have.length && match(i, j + 1));
    else ok = j < have.length && want[i]!.test(have[j]) && match(i + 1, j + 1);
    memo.set(key, ok);
    return ok;
  };
  if (match(0, 0)) return undefined;
  const { i, j } = furthest;
  if (i === want.length) return `${have.length - j} more line(s) than the README shows, from: ${actual[j]}`;
  return `README line ${JSON.stringify(expected[i])} not matched${j < actual.length ? ` by ${JSON.stringify(actual[j])}` : ' (the output ended)'}`;
}
