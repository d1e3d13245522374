// The static import graph of compiled ES modules: the files reached through relative `import` /
// `export … from` statements, and the bare packages they name. Dynamic import() is not followed
// (that is the point: optional code is imported dynamically).

import fs from "node:fs";
import path from "node:path";

const STATIC = /^\s*(?:import|export)\s+(?:[^'"]*?\s+from\s+)?["']([^"']+)["']/gm;

export function staticImports(entry: string): { files: string[]; packages: string[] } {
  const files = new Set<string>();
  const packages = new Set<string>();
  const visit = (file: string): void => {
    if (files.has(file)) return;
    files.add(file);
    const text = fs.readFileSync(file, "utf8");
    for (const m of text.matchAll(STATIC)) {
      const spec = m[1]!;
      if (spec.startsWith(".")) visit(path.resolve(path.dirname(file), spec));
      else if (!spec.startsWith("node:")) packages.add(spec.startsWith("@") ? spec.split("/").slice(0, 2).join("/") : spec.split("/")[0]!);
    }
  };
  visit(path.resolve(entry));
  return { files: [...files], packages: [...packages].sort() };
}
