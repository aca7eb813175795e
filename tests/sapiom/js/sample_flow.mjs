// The seed's sample flow through the official Sapiom fetch wrapper, unchanged but for the two
// base URLs (both falgate) and the API key (a falgate key): generate an image, then transform
// the generated image. Every request the process sends is recorded on its way out (method,
// URL, header names and the transaction header), so the test can see what the SDK did.
//
// usage: node sample_flow.mjs <falgate url> <falgate key> [flow|denied]
// prints one JSON object on stdout.
import { createFetch } from "@sapiom/fetch";

const [gatewayUrl, apiKey, mode = "flow"] = process.argv.slice(2);
const sent = [];
const nativeFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const request = new Request(input, init);
  sent.push({
    method: request.method,
    url: request.url,
    headers: [...request.headers.keys()].sort(),
    transactionId: request.headers.get("x-sapiom-transaction-id"),
  });
  return nativeFetch(request);
};

// The seed's code: the target's base URL and the control plane's base URL.
const TARGET_BASE_URL = gatewayUrl;
const fetch = createFetch({ apiKey, baseURL: gatewayUrl });

async function post(path, body) {
  const response = await fetch(`${TARGET_BASE_URL}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return {
    status: response.status,
    body: await response.json(),
    requestId: response.headers.get("x-request-id"),
    cost: response.headers.get("x-cost-usd"),
  };
}

const out = { mode, results: [], error: null, sent };
try {
  const generated = await post("/v1/run/fal-ai/flux/dev", {
    prompt: "a lighthouse on a cliff at dusk",
    image_size: "landscape_4_3",
  });
  out.results.push(generated);
  if (generated.status === 200) {
    out.results.push(
      await post("/v1/transform", {
        image_url: generated.body.images[0].url,
        prompt: "the same lighthouse in watercolour",
        image_size: "square",
        strength: 0.6,
      }),
    );
  }
} catch (error) {
  out.error = { name: error.name, message: error.message };
}
// The SDK completes transactions fire-and-forget; let those calls finish before reporting.
await new Promise((resolve) => setTimeout(resolve, 300));
process.stdout.write(JSON.stringify(out) + "\n");
