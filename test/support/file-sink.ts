/** An AtomicFileSink for a file path (tests): the sink takes its own fd of the file's directory. */
import path from 'node:path';
import { closeFd, FS, fsAt } from '../../src/ffi/fs-at';
import { AtomicFileSink } from '../../src/vm/snapshot-writer';

export async function fileSink(file: string): Promise<AtomicFileSink> {
  const dirFd = await fsAt.openat(FS.AT_FDCWD, path.dirname(file), FS.O_RDONLY | FS.O_DIRECTORY, 0);
  try {
    return await AtomicFileSink.create({ dirFd, name: path.basename(file), displayPath: file, replace: true }); // tests write where they like
  } finally {
    await closeFd(dirFd);
  }
}
