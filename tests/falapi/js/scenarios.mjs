// Drives the official @fal-ai/client against falgate through proxyUrl (x-fal-target-url).
// Usage: FALGATE_PROXY_URL=https://localhost:PORT/fal/proxy FAL_KEY=<falgate key>
//        NODE_EXTRA_CA_CERTS=<ca.pem> node scenarios.mjs <scenario>
// Prints one JSON object: what each call returned (or the error it raised).
import { createFalClient, ApiError, ValidationError } from "@fal-ai/client";

const fal = createFalClient({
  credentials: process.env.FAL_KEY,
  proxyUrl: { url: process.env.FALGATE_PROXY_URL, when: "always" },
});

function describe(error) {
  return {
    class: error instanceof ValidationError ? "ValidationError"
      : error instanceof ApiError ? "ApiError" : error.constructor.name,
    status: error.status,
    body: error.body,
    fieldErrors: error instanceof ValidationError ? error.fieldErrors : undefined,
    message: error.message,
  };
}

async function attempt(work) {
  try {
    return { ok: await work() };
  } catch (error) {
    return { error: describe(error) };
  }
}

const scenarios = {
  async run() {
    return attempt(() => fal.run("fal-ai/flux/dev", {
      input: { prompt: "a fox", image_size: "square", seed: 42, sync_mode: false },
    }));
  },
  async subscribe() {
    const updates = [];
    const out = await attempt(() => fal.subscribe("fal-ai/fast-sdxl", {
      input: { prompt: "a fox", image_size: "square", format: "png" },
      logs: true,
      pollInterval: 100,
      onQueueUpdate: (update) => updates.push(update.status),
    }));
    return { ...out, updates };
  },
  async queue() {
    const id = "fal-ai/flux/schnell";
    const submitted = await fal.queue.submit(id, { input: { prompt: "x", image_size: "square" } });
    const requestId = submitted.request_id;
    const first = await fal.queue.status(id, { requestId, logs: true });
    let status = first;
    for (let i = 0; i < 200 && status.status !== "COMPLETED"; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      status = await fal.queue.status(id, { requestId, logs: false });
    }
    const result = await fal.queue.result(id, { requestId });
    return { submitted, first, status, result };
  },
  async cancel() {
    const id = "fal-ai/flux-pro/v1.1";
    const submitted = await fal.queue.submit(id, { input: { prompt: "x", image_size: "square" } });
    const requestId = submitted.request_id;
    const cancelled = await attempt(() => fal.queue.cancel(id, { requestId }));
    let status;
    for (let i = 0; i < 200; i++) {
      status = await fal.queue.status(id, { requestId, logs: false });
      if (status.status === "COMPLETED") break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return { requestId, cancelled, status };
  },
  async invalid() {
    return attempt(() => fal.run("fal-ai/flux/dev", { input: { num_images: 9 } }));
  },
  async foreign() {
    // FOREIGN_REQUEST_ID: a request id another key submitted.
    const requestId = process.env.FOREIGN_REQUEST_ID;
    return {
      status: await attempt(() => fal.queue.status("fal-ai/flux/dev", { requestId })),
      result: await attempt(() => fal.queue.result("fal-ai/flux/dev", { requestId })),
      cancel: await attempt(() => fal.queue.cancel("fal-ai/flux/dev", { requestId })),
    };
  },
};

const name = process.argv[2];
if (!(name in scenarios)) {
  console.error(`unknown scenario ${name}`);
  process.exit(2);
}
process.stdout.write(JSON.stringify(await scenarios[name]()) + "\n");
