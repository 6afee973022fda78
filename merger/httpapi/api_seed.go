package httpapi

import "github.com/dnbd3go/dnbd3go/merger"

// seedAPI is the 2022 API (reference service up to ba7101a, dnbd3 up to
// 9bf6fbc): /api/File/*, guid and blockNumber, full-cluster updates,
// "blocks" in the replies (which are clusters all the same).
var seedAPI = &generation{
	name:        "api",
	prefix:      "/api/file/",
	mergeAction: "startmerge",
	uuidKey:     "guid",
	revisionKey: "version",
	clusterKey:  "blockNumber",
	fullOnly:    true,
	statusReply: func(s merger.SessionInfo) any {
		return statusSeed{
			ImageName:            s.ImageName,
			MergedBlocks:         s.MergedClusters,
			NewImageVersion:      s.NewRevision,
			OriginalImageVersion: s.OriginalRevision,
			State:                s.State,
			TotalBlocks:          s.TotalClusters,
		}
	},
	topReply: func(cs []merger.ClusterCount) any {
		out := make([]topSeed, len(cs))
		for i, c := range cs {
			out[i] = topSeed{BlockNumber: c.Cluster, Modifications: c.Modifications}
		}
		return out
	},
}

// statusSeed is the reply of GET /api/File/Status.
type statusSeed struct {
	ImageName            string       `json:"imageName"`
	MergedBlocks         int          `json:"mergedBlocks"`
	NewImageVersion      int          `json:"newImageVersion"`
	OriginalImageVersion int          `json:"originalImageVersion"`
	State                merger.State `json:"state"`
	TotalBlocks          int          `json:"totalBlocks"`
}

// topSeed is one entry of GET /api/File/GetTopModifiedBlocks.
type topSeed struct {
	BlockNumber   int    `json:"blockNumber"`
	Modifications uint32 `json:"modifications"`
}
