// A process that holds a relay store's write lock for a while, as a concurrent `dlq purge` or a
// backup tool would: the chaos checker's "store busy" fault. Usage: <relay.db> <hold ms>.

import Database from "better-sqlite3";

const [file, holdMs] = process.argv.slice(2);
const db = new Database(file!, { timeout: 10_000 });
db.exec("BEGIN IMMEDIATE");
setTimeout(() => {
  db.exec("COMMIT");
  db.close();
  process.exit(0);
}, Number(holdMs));
