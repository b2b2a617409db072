package modelrouter

import (
	"net/http"
	"net/http/httptrace"
)

// Connection reuse to llama-server without losing a request.
//
// llama-server (cpp-httplib) closes its connection right after a streamed answer although the
// answer promised keep-alive. Go's transport (Traefik's proxy) has already put that connection
// back in its pool when the close arrives, and a request sent on it in that moment fails: 500
// or 502, about 5 in 100 requests of a streamed/plain mix here with reuse on (the lead's spike,
// issue 21; docs/production.md has the numbers). Two things make such a request go out again:
//
//   - Go's transport retries by itself on a reused connection that turns out dead when the
//     request is replayable: GetBody set (setBody) and an Idempotency-Key header present. A
//     nil value marks it without sending anything to llama-server.
//   - That retry does not cover a write that failed after its first bytes (the reset arrived
//     between the header write and the body write: "write: broken pipe", 1 to 4 in 400). So
//     the guard retries too: when the connection was reused and not one byte of an answer came
//     back, the request never reached llama-server's handler, and the failure it got from the
//     proxy is swallowed and the request sent again, at most maxAttempts times in all.
//
// A fresh connection that fails, or any answer of which a byte arrived, goes to the client
// as it is: a llama-server that is down still gets its 502 (and routheon-errors' JSON).
const maxAttempts = 3

const idempotencyHeader = "X-Idempotency-Key"

// attempt is what one try learned; a pointer, so the trace's callbacks and the writer share it.
type attempt struct {
	reused   bool
	answered bool
	failed   bool
}

// serveReplaying hands the request on, again when a reused connection failed before any answer.
func (m *ModelRouter) serveReplaying(rw http.ResponseWriter, req *http.Request, pieces [][]byte) {
	req.Header[idempotencyHeader] = nil
	for number := 1; ; number++ {
		state := &attempt{}
		trace := &httptrace.ClientTrace{
			GotConn:              func(info httptrace.GotConnInfo) { state.reused = info.Reused },
			GotFirstResponseByte: func() { state.answered = true },
		}
		try := req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
		setBody(try, pieces)
		m.next.ServeHTTP(&replayWriter{rw: rw, state: state, last: number == maxAttempts}, try)
		if !state.failed {
			return
		}
	}
}

// replayWriter passes the answer on, but swallows the proxy's error for a request that never
// reached llama-server, so it can be sent again. Every Write is followed by a Flush of the
// wrapped writer: Yaegi hides a wrapper's own Flush method from Traefik (traefik#10269), and
// a stream would otherwise reach the client only at its end.
type replayWriter struct {
	rw    http.ResponseWriter
	state *attempt
	last  bool
}

func (w *replayWriter) Header() http.Header {
	return w.rw.Header()
}

func (w *replayWriter) WriteHeader(code int) {
	if code >= http.StatusInternalServerError && w.state.reused && !w.state.answered && !w.last {
		w.state.failed = true
		return
	}
	w.rw.WriteHeader(code)
}

func (w *replayWriter) Write(data []byte) (int, error) {
	if w.state.failed {
		return len(data), nil
	}
	n, err := w.rw.Write(data)
	w.Flush()
	return n, err
}

func (w *replayWriter) Flush() {
	if flusher, ok := w.rw.(http.Flusher); ok && !w.state.failed {
		flusher.Flush()
	}
}
