// One WebSocket subscriber: node --experimental-websocket subscriber.mjs URL CHANNEL
// Prints "subscribed" once the server confirmed, and its counts on SIGTERM.
const [url, channel] = process.argv.slice(2);
const counts = {};
const ws = new WebSocket(url);
ws.onopen = () => ws.send(JSON.stringify({ type: 'subscribe', data: { channel } }));
ws.onmessage = (m) => {
  const t = JSON.parse(m.data).type;
  counts[t] = (counts[t] || 0) + 1;
  if (t === 'subscribed') console.log('subscribed');
};
ws.onerror = (e) => console.log('error', e.message || e);
ws.onclose = (e) => console.log('closed', e.code);
process.on('SIGTERM', () => { console.log('counts', JSON.stringify(counts)); process.exit(0); });
