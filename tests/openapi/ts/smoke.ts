// The generated TypeScript client against a live gateway (run by
// tests/openapi/test_generated_clients.py, which checks the JSON line printed at the end).
// Compiled with `tsc --strict`: every field used below must exist, with its type, in the
// client generated from /openapi.json.
import { type Auth, createClient, createConfig } from "./generated/client/index.js";
import {
  createKey,
  exportLedger,
  generate,
  getRequest,
  getUsage,
  priceGenerate,
} from "./generated/sdk.gen.js";
import type { ErrorEnvelope, GenerateRequest } from "./generated/types.gen.js";

declare const process: {
  env: Record<string, string | undefined>;
  exit(code: number): never;
};

function need(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

function fail(message: string): never {
  throw new Error(message);
}

const baseUrl = need("FALGATE_URL");
// The token for the bearer scheme only: the document also offers X-API-Key and a Sapiom
// transaction header, which are other ways to authenticate, not the same secret.
const bearer = (token: string) => (auth: Auth) => (auth.scheme === "bearer" ? token : undefined);
const admin = createClient(createConfig({ baseUrl, auth: bearer(need("ADMIN_TOKEN")) }));
const keyClient = (key: string) => createClient(createConfig({ baseUrl, auth: bearer(key) }));
const body: GenerateRequest = { prompt: "a red fox", image_size: "square" };

async function main(): Promise<void> {
  const client = keyClient(need("FALGATE_KEY"));

  const price = await priceGenerate({ client, body });
  const amount: string = price.data?.amount_usd ?? fail(`price: ${price.response.status}`);

  const done = await generate({ client, body });
  const result = done.data ?? fail(`generate: ${done.response.status}`);
  const image = result.images[0] ?? fail("generate: no image");
  const generated = {
    cost: result.cost.amount_usd,
    width: image.width,
    header: done.response.headers.get("X-Cost-USD"),
  };

  const requestId = done.response.headers.get("X-Request-Id") ?? fail("no X-Request-Id");
  const outcome = await getRequest({ client, path: { request_id: requestId } });
  const record = outcome.data ?? fail(`getRequest: ${outcome.response.status}`);

  const usage = await getUsage({ client });
  const spent: string = usage.data?.spent_usd ?? fail(`usage: ${usage.response.status}`);

  // A key's creation, then a 429 from its rpm of 1 as a typed error.
  const limitedKey = await createKey({
    client: admin,
    body: { name: "ts-limited", budget_usd: "1", rpm: 1 },
  });
  const created = limitedKey.data ?? fail(`createKey: ${limitedKey.response.status}`);
  const limitedClient = keyClient(created.key);
  await generate({ client: limitedClient, body });
  const limited = await generate({ client: limitedClient, body });
  const rateError: ErrorEnvelope = limited.error ?? fail("expected a 429");

  // A 402 from a budget smaller than the estimate, as a typed error with its amounts.
  const poorKey = await createKey({ client: admin, body: { name: "ts-poor", budget_usd: "0.001" } });
  const poor = poorKey.data ?? fail(`createKey: ${poorKey.response.status}`);
  const refused = await generate({ client: keyClient(poor.key), body });
  const budgetError: ErrorEnvelope = refused.error ?? fail("expected a 402");

  // The ledger: CSV is text; JSON lines are text too when asked for as such.
  const csv = await exportLedger({ client: admin, query: { key_id: created.id, format: "csv" } });
  const csvText: string = csv.data ?? fail(`ledger: ${csv.response.status}`);
  const jsonl = await exportLedger({ client: admin, query: { key_id: created.id }, parseAs: "text" });
  const lines: string = jsonl.data ?? fail(`ledger: ${jsonl.response.status}`);
  const events = lines
    .trim()
    .split("\n")
    .map((line) => (JSON.parse(line) as { event: string }).event);

  console.log(
    JSON.stringify({
      price: amount,
      generated,
      request: { status: record.status, cost: record.cost?.amount_usd },
      spent,
      created: { prefix: created.key.slice(0, 4), budget: created.budget_usd },
      rateLimited: {
        status: limited.response.status,
        type: rateError.error.type,
        limitType: rateError.error.limit_type,
      },
      budgetExceeded: {
        status: refused.response.status,
        type: budgetError.error.type,
        estimate: budgetError.error.estimate_usd,
        remaining: budgetError.error.remaining_usd,
      },
      ledger: { csvHeader: csvText.startsWith("timestamp,event,key_id"), events },
    }),
  );
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
