/**
 * Runs in jest's main process. A failing `expect(...).toBe(5n)` keeps the bigints in its failure
 * details, and `jest --json` (which scripts/test.sh reads for its "N passed, N failed" line) then
 * dies on JSON.stringify: the count printed was "0 passed, 1 failed". Bigints serialize as strings.
 */
module.exports = async () => {
  if (!BigInt.prototype.toJSON)
    BigInt.prototype.toJSON = function toJSON() {
      return this.toString();
    };
};
