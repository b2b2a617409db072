package modelrouter

// Connection reuse to llama-server without lost requests.
//
// llama-server (cpp-httplib) closes its connection right after each streamed answer although
// the answer's headers promise keep-alive. Traefik puts the connection back in its pool as soon
// as the stream ends, and a request sent on it a moment later meets the closing socket: Traefik
// answers 502 (EOF, broken pipe) or 500 (http: server closed idle connection). The guard in
// front of every llama-server therefore
//
//  1. marks each request replayable for Go's transport (setBody: GetBody, and a nil-valued
//     X-Idempotency-Key, which marks the request idempotent without being sent): the transport
//     then sends it again itself when a reused connection turns out closed before the request
//     went out, or gives EOF before any answer;
//  2. sends a request with a body again itself (serveReplaying) when a reused connection failed
//     after part of it went out, which the transport never retries: Go 1.26 (Traefik 3.7.15)
//     writes a request's headers and its body in two writes, and the reset that the closed
//     socket answers the headers with fails the second one (`write: broken pipe`). Only when the
//     connection had served a request before, no byte of an answer arrived, and the proxy
//     answered 500 or 502; at most maxAttempts sends. Never for a fresh connection (the backend
//     is down: the error goes to the client at once), never once a byte of an answer arrived (a
//     backend's own 500 or 502 is passed on), never for a timeout (504). A request without a
//     body goes out in one write, and 1 covers it.
//
// Measured with Traefik 3.7.15 on 2 cores, two busy loops, two clients alternating streamed and
// plain requests to a stand-in that closes after streams (bench/reuse.py; docs/production.md,
// "Connections to llama-server"): plain Traefik with reuse lost 74 and 617 of 10,000 requests
// (two runs); the guard with 1 alone 6 (key file) and 2 (granted key) of 3,000, all `broken
// pipe`; with both, none of 10,000 for either kind of key, in both runs.

import (
	"net/http"
	"net/http/httptrace"
	"sync/atomic"
)

// maxAttempts bounds the sends of one request: a second attempt gets a connection that was
// in the pool as well, or a new one; a third is there for the rare second closing connection.
const maxAttempts = 3

// idempotencyKey, present with a nil value, makes Go's transport treat a request as
// replayable; a nil-valued header is not written to the wire (net/http, Transport).
const idempotencyKey = "X-Idempotency-Key"

// attempt is what Go's transport told about one send of the request. It is held by pointer:
// the trace's callbacks and the writer share it (Yaegi, which interprets this file, lost
// fields set through copies of a struct in an earlier spike).
type attempt struct {
	// reused: the connection the transport got last had served a request before. Set on every
	// connection it gets, its own retries included; a dial that fails after a reused connection
	// failed leaves it set, which costs one more attempt (one more failing dial) at most.
	reused int32
	// answered: a byte of the backend's answer arrived (the readLoop goroutine sets it).
	answered int32
	// dropped: the error answer of this attempt was swallowed; the request goes again.
	dropped bool
}

// retryable says whether the proxy's status for this attempt is a reused connection's failure
// that another attempt may fix.
func (a *attempt) retryable(status int) bool {
	return (status == http.StatusBadGateway || status == http.StatusInternalServerError) &&
		atomic.LoadInt32(&a.reused) == 1 && atomic.LoadInt32(&a.answered) == 0
}

// serveReplaying passes the request on, and a request with a body again (at most maxAttempts
// sends in all) while an attempt fails on a reused connection before any byte of an answer.
//
// Each attempt costs Traefik about 0.06 ms of CPU here (Yaegi runs the trace's callbacks and
// the writer's methods), which is why a request without a body, which Go's transport replays
// itself, goes on without them.
func (m *ModelRouter) serveReplaying(rw http.ResponseWriter, req *http.Request) {
	if req.Body == nil || req.Body == http.NoBody {
		m.next.ServeHTTP(rw, req)
		return
	}
	for number := 1; ; number++ {
		try := &attempt{}
		trace := &httptrace.ClientTrace{
			// every parameter named: an unnamed one made Yaegi panic here (reflect.Set: value of
			// type string is not assignable)
			GotConn: func(info httptrace.GotConnInfo) {
				reused := int32(0)
				if info.Reused {
					reused = 1
				}
				atomic.StoreInt32(&try.reused, reused)
			},
			GotFirstResponseByte: func() { atomic.StoreInt32(&try.answered, 1) },
		}
		send := req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
		if number > 1 {
			send.Body, _ = req.GetBody()
		}
		m.next.ServeHTTP(&replayWriter{rw: rw, try: try, last: number == maxAttempts}, send)
		if !try.dropped {
			return
		}
	}
}

// replayWriter passes an attempt's answer on, unless it is a failure another attempt may fix.
//
// It flushes after every write: Traefik's proxy flushes a stream through http.Flusher, which it
// cannot see on a writer that Yaegi interprets (traefik#10269), and would otherwise hold a
// stream until its end. A Flush method is kept for callers that do see it.
type replayWriter struct {
	rw   http.ResponseWriter
	try  *attempt
	last bool
}

func (w *replayWriter) Header() http.Header {
	return w.rw.Header()
}

func (w *replayWriter) WriteHeader(status int) {
	if !w.last && w.try.retryable(status) {
		w.try.dropped = true
		return
	}
	w.rw.WriteHeader(status)
}

func (w *replayWriter) Write(data []byte) (int, error) {
	if w.try.dropped {
		return len(data), nil
	}
	n, err := w.rw.Write(data)
	w.Flush()
	return n, err
}

func (w *replayWriter) Flush() {
	if flusher, ok := w.rw.(http.Flusher); ok && !w.try.dropped {
		flusher.Flush()
	}
}
