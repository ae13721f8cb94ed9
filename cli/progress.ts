// The progress bar long commands draw on stderr (sweep, sim): only when stderr is a
// terminal, so pipes and logs stay clean; redrawn at most every 100 ms; erased before the
// results print.
export interface Progress {
  update(done: number): void;
  clear(): void;
}

type Terminal = Pick<NodeJS.WriteStream, 'write'> & { isTTY?: boolean };

export function progressBar(total: number, unit: string, to: Terminal = process.stderr): Progress {
  if (!to.isTTY || total <= 0) return { update() {}, clear() {} };
  const width = 30;
  let drawnAt = -Infinity;
  return {
    update(done) {
      const t = performance.now();
      if (done < total && t - drawnAt < 100) return;
      drawnAt = t;
      const fill = Math.round((width * Math.min(done, total)) / total);
      to.write(`\r[${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${done}/${total} ${unit}`);
    },
    clear() {
      if (drawnAt > -Infinity) to.write('\r\x1b[K');
    },
  };
}
